"""The shipped default model folders and data are exactly what scripts/build_default_assets.py writes,
and their valid/test splits are honest: built from names, places and products never seen in training."""

import filecmp
import json
import re
from collections import Counter

import pytest

from scripts.build_default_assets import SPLIT_SIZES, main
from scripts.default_assets import DATASETS
from scripts.default_assets.common import SPLIT_SIZES as NEW_SPLIT_SIZES
from scripts.default_assets.ner import TAGS
from scripts.default_assets.sentiment import LABELS
from scripts.default_assets.vocab import ORG_SUFFIXES, POOLS
from tests.helpers import EXAMPLE

MODELS = ("tiny-llama", "tiny-t5")
DATA_FILES = [f"data/toy_instructions_{s}.json" for s in SPLIT_SIZES] + [
    f"data/{name}_{s}.json" for name in DATASETS for s in NEW_SPLIT_SIZES
]


def load(name: str, split: str) -> list:
    return [json.loads(line) for line in (EXAMPLE / "data" / f"{name}_{split}.json").read_text().splitlines()]


def words(text: str) -> set:
    return set(re.findall(r"[A-Za-z]+", text))


def test_assets_rebuild_identical(tmp_path):
    """Byte-identical, except config.json's transformers_version (the GPU machine runs another transformers)."""
    main(["--out-dir", str(tmp_path)])
    tokenizer_files = [f"model/{m}/{f}" for m in MODELS for f in ("tokenizer.json", "tokenizer_config.json")]
    for rel in tokenizer_files + DATA_FILES:
        assert filecmp.cmp(tmp_path / rel, EXAMPLE / rel, shallow=False), f"{rel} differs from the committed file"
    for model in MODELS:
        built, committed = (
            json.loads((root / f"model/{model}/config.json").read_text()) for root in (tmp_path, EXAMPLE)
        )
        built.pop("transformers_version"), committed.pop("transformers_version")
        assert built == committed, model


def test_test_split_is_unseen_in_training():
    def keys(split):
        lines = (EXAMPLE / "data" / f"toy_instructions_{split}.json").read_text().splitlines()
        return {(r["instruction"], r["input"]) for r in map(json.loads, lines)}

    train = keys("train")
    assert not keys("test") & train and not keys("valid") & train


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_split_sizes_and_files_modest(name):
    for split, size in NEW_SPLIT_SIZES.items():
        assert len(load(name, split)) == size
        assert (EXAMPLE / "data" / f"{name}_{split}.json").stat().st_size < 1_000_000


def test_sentiment_labels_balanced():
    for split in NEW_SPLIT_SIZES:
        counts = Counter(r["label"] for r in load("toy_sentiment", split))
        assert set(counts) == set(LABELS) and max(counts.values()) - min(counts.values()) <= 1, counts


def test_sentiment_products_held_out():
    """Each valid/test review is about a product (and brand) of its own split, and no word of those occurs in
    train; the sentiment lexicon is shared on purpose."""
    train_words = {w.lower() for r in load("toy_sentiment", "train") for w in words(r["text"])}
    for split in ("valid", "test"):
        held_out = {w.lower() for w in POOLS[split]["products"] + POOLS[split]["brands"]}
        assert not held_out & train_words
        for r in load("toy_sentiment", split):
            assert {w.lower() for w in words(r["text"])} & set(POOLS[split]["products"]), r


def entities(record: dict) -> list:
    """``(type, words)`` of each BIO span of a toy_ner record."""
    spans = []
    for word, tag in zip(record["tokens"], record["tags"]):
        if tag.startswith("B-"):
            spans.append((tag[2:], [word]))
        elif tag.startswith("I-"):
            spans[-1][1].append(word)
    return spans


@pytest.mark.parametrize("split", sorted(NEW_SPLIT_SIZES))
def test_ner_tags_valid(split):
    for r in load("toy_ner", split):
        assert len(r["tokens"]) == len(r["tags"]) and all(" " not in t for t in r["tokens"])
        assert set(r["tags"]) <= set(TAGS), r
        for prev, tag in zip(["O"] + r["tags"], r["tags"]):
            assert not tag.startswith("I-") or prev[2:] == tag[2:], r  # an I- continues a span of its type


def test_ner_entities_held_out():
    """No entity word of valid/test occurs anywhere in train, except the shared organisation suffixes."""
    train_words = {w for r in load("toy_ner", "train") for w in r["tokens"]}
    for split in ("valid", "test"):
        records = load("toy_ner", split)
        held_out = {w for r in records for _, span in entities(r) for w in span} - set(ORG_SUFFIXES)
        assert held_out and not held_out & train_words
        assert all(entities(r) for r in records)
        assert {tag for r in records for tag in r["tags"]} == set(TAGS)


@pytest.mark.parametrize("split", sorted(NEW_SPLIT_SIZES))
def test_qa_answer_offsets(split):
    records = load("toy_qa", split)
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        (text,), (start,) = r["answers"]["text"], r["answers"]["answer_start"]
        assert r["context"][start : start + len(text)] == text, r
        assert len(r["context"].split()) < 60


def test_qa_names_and_answers_held_out():
    """Every capitalised word of a valid/test record (names, places, organisations) is absent from train,
    apart from question words and organisation suffixes."""
    train_words = {w for r in load("toy_qa", "train") for w in words(r["context"] + " " + r["question"])}
    common = {"Where", "Who"} | set(ORG_SUFFIXES)
    for split in ("valid", "test"):
        for r in load("toy_qa", split):
            names = {w for w in words(r["context"] + " " + r["question"]) if w[0].isupper()} - common
            assert names and not names & train_words, r
            assert not (words(r["answers"]["text"][0]) - common) & train_words


def test_pairs_twins_and_names_held_out():
    """Records 2k and 2k+1 swap the roles (same words, other meaning); valid/test names are unseen in train."""
    train_names = {w for r in load("toy_pairs", "train") for w in words(r["text"]) if w[0].isupper()}
    for split in NEW_SPLIT_SIZES:
        records = load("toy_pairs", split)
        for a, b in zip(records[::2], records[1::2]):
            assert sorted(re.findall(r"\w+", a["text_pair"])) == sorted(re.findall(r"\w+", b["text_pair"]))
            assert a["text_pair"] != b["text_pair"] and a["text"] != b["text"]
        assert len({r["text"] for r in records}) == len(records)
        if split != "train":
            names = {w for r in records for w in words(r["text"] + " " + r["text_pair"]) if w[0].isupper()}
            assert names and not names & train_names


def test_tiny_t5_loads_trains_and_generates():
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    folder = EXAMPLE / "model" / "tiny-t5"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(folder))
    assert model.config.decoder_start_token_id == tokenizer.pad_token_id == 0
    assert model.config.eos_token_id == tokenizer.eos_token_id and model.config.vocab_size == len(tokenizer)
    batch = tokenizer(["What is the first word? apple cat"], return_tensors="pt")
    labels = tokenizer(["apple"], return_tensors="pt").input_ids
    assert labels[0, -1] == tokenizer.eos_token_id  # T5 convention: EOS appended, no BOS
    loss = model(**batch, labels=labels).loss
    assert loss.item() < 2 * torch.log(torch.tensor(float(len(tokenizer)))).item()  # sane init scale
    loss.backward()
    generated = model.generate(**batch, max_new_tokens=4)
    assert generated[0, 0] == model.config.decoder_start_token_id
