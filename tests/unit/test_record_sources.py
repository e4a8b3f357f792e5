"""A split's records from JSON, JSON lines, parquet and save_to_disk folders, for every dataset type; errors
that name the file and the line or record."""

import json
import types

import datasets
import pytest
from transformers import AutoTokenizer

from fairseq_ext.data.instruction import build_instruction_split
from fairseq_ext.data.records import read_split
from fairseq_ext.data.sources import find_split_source
from fairseq_ext.errors import UserInputError
from tests.helpers import MODEL_DIR

RECORDS = [
    {"instruction": "What is the first word?", "input": "cat dog", "output": "cat"},
    {"instruction": "Say hi.", "input": None, "output": "hi"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


def write(folder, kind, records=RECORDS, name="toy", split="train"):
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{name}_{split}"
    if kind == "json":
        stem.with_suffix(".json").write_text(
            json.dumps([{k: v for k, v in r.items() if v is not None} for r in records])
        )
    elif kind == "jsonl":
        stem.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    elif kind == "parquet":
        datasets.Dataset.from_list(records).to_parquet(str(stem.with_suffix(".parquet")))
    elif kind == "disk":
        datasets.Dataset.from_list(records).save_to_disk(str(stem))
    elif kind == "disk_dict":
        datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(records), "validation": datasets.Dataset.from_list(records[:1])}
        ).save_to_disk(str(folder))


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "disk", "disk_dict"])
def test_instruction_samples_are_the_same_from_every_format(tmp_path, tokenizer, kind):
    write(tmp_path / "ref", "jsonl")
    write(tmp_path / kind, kind)
    cfg = lambda folder: types.SimpleNamespace(data=str(folder), dataset_name="toy", prompt_type="alpaca")  # noqa: E731
    expected = build_instruction_split(cfg(tmp_path / "ref"), "train", tokenizer)
    got = build_instruction_split(cfg(tmp_path / kind), "train", tokenizer)
    assert list(got["input_ids"]) == list(expected["input_ids"]) and list(got["labels"]) == list(expected["labels"])
    if kind == "disk_dict":
        assert find_split_source(str(tmp_path / kind), "toy", "valid").member == "validation"


def test_other_types_read_parquet_too(tmp_path):
    rows = [{"text": "good", "label": "positive"}, {"text": "bad", "label": "negative"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "reviews_train.parquet"))
    assert read_split(str(tmp_path), "reviews", "train", {"text": str, "label": (str, int)}) == rows


def test_two_files_for_one_split_is_an_error(tmp_path, tokenizer):
    write(tmp_path, "json")
    write(tmp_path, "parquet")
    with pytest.raises(
        UserInputError, match="split train has several record files: .*toy_train.json, .*toy_train.parquet"
    ):
        find_split_source(str(tmp_path), "toy", "train")


@pytest.mark.parametrize(
    "kind, records, message",
    [
        ("jsonl", None, r"toy_train\.jsonl:2: malformed JSON line"),
        ("jsonl", [RECORDS[0], {"instruction": "a"}], r"toy_train\.jsonl: line 2: record is missing field 'output'"),
        (
            "jsonl",
            [RECORDS[0], {"instruction": "a", "output": 3}],
            r"toy_train\.jsonl: line 2: field 'output' must be a string",
        ),
        (
            "parquet",
            [RECORDS[0], {"instruction": "a", "output": None}],
            r"toy_train\.parquet: record 2: record is missing field 'output'",
        ),
    ],
)
def test_bad_records_name_file_and_line_or_record(tmp_path, tokenizer, kind, records, message):
    if records is None:
        (tmp_path / "toy_train.jsonl").write_text(json.dumps(RECORDS[0]) + '\n{"instruction": \n')
    else:
        write(tmp_path, kind, records)
    with pytest.raises(UserInputError, match=message):
        build_instruction_split(
            types.SimpleNamespace(data=str(tmp_path), dataset_name="toy", prompt_type="plain"), "train", tokenizer
        )


def test_parquet_is_read_in_batches_smaller_than_its_row_groups(tmp_path, monkeypatch):
    """A parquet file's records are read page by page in batches of rows, whatever its row groups: the same
    records, nested values and null fields included, and an unreadable file is one clear error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fairseq_ext.data import sources

    rows = [
        {"instruction": f"say {i}", "input": None if i % 3 else "x", "output": str(i), "tags": [{"k": i}]}
        for i in range(25)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "toy_train.parquet", row_group_size=20)
    monkeypatch.setattr(sources, "PARQUET_BATCH_ROWS", 7)
    records = sources.load_source(sources.find_split_source(str(tmp_path), "toy", "train"), str(tmp_path / "c"))
    assert records.to_list() == rows
    (tmp_path / "bad_train.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserInputError, match=r"bad_train\.parquet: cannot be read as parquet records"):
        sources.load_source(sources.find_split_source(str(tmp_path), "bad", "train"), str(tmp_path / "c"))
