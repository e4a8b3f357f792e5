"""The disk dataset type: save_to_disk folders with text, tokenized or instruction columns."""

from types import SimpleNamespace

import datasets
import pytest
from transformers import AutoTokenizer

from fairseq_ext.data.disk import build_disk_split, read_disk_labels
from fairseq_ext.data.instruction import IGNORE_INDEX
from fairseq_ext.data.layouts import get_layout
from fairseq_ext.data.tokenized import to_hf_dataset
from fairseq_ext.errors import UserInputError
from tests.helpers import MODEL_DIR


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


def save(tmp_path, columns, splits=("train", "validation", "test")):
    folder = tmp_path / "ds"
    datasets.DatasetDict({s: datasets.Dataset.from_dict(columns) for s in splits}).save_to_disk(str(folder))
    return SimpleNamespace(data=str(folder), prompt_type="plain")


def test_text_column_trains_on_every_token(tmp_path, tokenizer):
    cfg = save(tmp_path, {"text": ["cat dog", "owl"]})
    out = build_disk_split(cfg, "valid", tokenizer)  # "valid" finds the "validation" split
    ids = tokenizer("cat dog")["input_ids"] + [tokenizer.eos_token_id]
    assert out["input_ids"][0] == ids and out["labels"][0] == ids


def test_tokenized_columns_are_used_as_they_are(tmp_path, tokenizer):
    cfg = save(tmp_path, {"input_ids": [[1, 7, 8]], "labels": [[-100, 7, 8]], "extra": ["x"]})
    out = to_hf_dataset(build_disk_split(cfg, "train", tokenizer), get_layout("causal_lm"))
    assert out.column_names == ["input_ids", "labels"]  # the layout keeps its own columns
    assert out["labels"][0] == [-100, 7, 8]
    cfg = save(tmp_path / "c", {"input_ids": [[1, 7, 8]], "label": [2]})
    out = to_hf_dataset(build_disk_split(cfg, "train", tokenizer), get_layout("seq_cls"))
    assert out.column_names == ["input_ids", "label"] and out["label"] == [2]
    cfg = save(tmp_path / "b", {"input_ids": [[1, 7, 8]]})
    assert build_disk_split(cfg, "train", tokenizer)["labels"][0] == [1, 7, 8]


def test_instruction_columns_mask_the_prompt(tmp_path, tokenizer):
    cfg = save(tmp_path, {"instruction": ["What is the last word?"], "input": ["cat owl"], "output": ["owl"]})
    sample = build_disk_split(cfg, "test", tokenizer)[0]
    trained = [t for t in sample["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "owl</s>"


def test_disk_errors_name_what_to_change(tmp_path, tokenizer):
    with pytest.raises(UserInputError, match="no such folder"):
        build_disk_split(SimpleNamespace(data=str(tmp_path / "absent"), prompt_type="plain"), "train", tokenizer)
    cfg = save(tmp_path, {"text": ["a"]}, splits=("train",))
    with pytest.raises(UserInputError, match="has no split 'test'; it has: train"):
        build_disk_split(cfg, "test", tokenizer)
    cfg = save(tmp_path / "c", {"question": ["a"]})
    with pytest.raises(UserInputError, match="expected input_ids"):
        build_disk_split(cfg, "train", tokenizer)


def test_a_label_column_is_the_label_set(tmp_path, tokenizer):
    path = tmp_path / "cls"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"input_ids": [[1, 7], [1, 8]], "label": ["pos", "neg"]}),
            "validation": datasets.Dataset.from_dict({"input_ids": [[1, 9]], "label": ["pos"]}),
        }
    ).save_to_disk(str(path))
    cfg = SimpleNamespace(data=str(path), prompt_type="plain")
    assert read_disk_labels(cfg).names == ["neg", "pos"]
    assert build_disk_split(cfg, "valid", tokenizer)["label"] == [1]
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"input_ids": [[1, 7]], "label": [0]}),
            "test": datasets.Dataset.from_dict({"input_ids": [[1, 9]], "label": [4]}),
        }
    ).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(UserInputError, match=r"split test has labels \['4'\] that train does not have"):
        read_disk_labels(SimpleNamespace(data=str(tmp_path / "bad")))
