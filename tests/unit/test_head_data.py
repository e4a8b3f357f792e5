"""Dataset types of the classification, token classification, QA and text-pair heads, on the real MiniLM tokenizer."""

import json
from types import SimpleNamespace

import pytest
import torch

from fairseq_ext.data.classification import build_classification_split, read_classification_labels
from fairseq_ext.data.labels import label_set
from fairseq_ext.data.layouts import IGNORE_INDEX
from fairseq_ext.data.question_answering import build_question_answering_split
from fairseq_ext.data.text_pairs import build_text_pairs_split
from fairseq_ext.data.token_classification import align_word_labels, build_token_classification_split
from fairseq_ext.errors import UserInputError
from fairseq_ext.evaluation.classification import entity_f1, entity_spans
from fairseq_ext.evaluation.question_answering import best_span, f1_score, normalize
from fairseq_ext.models.hf_loading import load_tokenizer
from tests.helpers import minilm_folder


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(minilm_folder())


def write_splits(folder, name, splits):
    for split, records in splits.items():
        (folder / f"{name}_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    return SimpleNamespace(data=str(folder), dataset_name=name, sequence_length=64)


def test_label_names_are_sorted_and_ids_are_kept():
    names = label_set({"train": ["pos", "neg", "pos"], "test": ["neg"]})
    assert names.names == ["neg", "pos"] and names.index("pos") == 1
    assert names.id2label == {0: "neg", 1: "pos"}
    ids = label_set({"train": [0, 3], "valid": [3]})
    assert ids.names == ["0", "1", "2", "3"] and ids.index(3) == 3


@pytest.mark.parametrize(
    "splits, message",
    [
        ({"train": ["a"], "test": ["b"]}, r"split test has labels \['b'\] that train does not have"),
        ({"train": ["a", 1]}, r"all strings \(names\) or all integers \(ids\)"),
        ({"train": [-1, 2]}, r"non-negative"),
    ],
)
def test_bad_label_sets(splits, message):
    with pytest.raises(UserInputError, match=message):
        label_set(splits)


def test_classification_encodes_text_pairs_with_token_types(tmp_path, tokenizer):
    cfg = write_splits(
        tmp_path,
        "cls",
        {"train": [{"text": "a cat", "text_pair": "a dog", "label": "same"}, {"text": "an owl", "label": "other"}]},
    )
    samples = build_classification_split(cfg, "train", tokenizer)
    assert [s["label"] for s in samples] == [1, 0]  # other=0, same=1
    assert samples[0]["token_type_ids"].count(1) == 3  # "a dog [SEP]"
    assert samples[0]["input_ids"] == tokenizer("a cat", "a dog")["input_ids"]
    assert read_classification_labels(cfg).names == ["other", "same"]


def test_first_sub_token_of_each_word_carries_its_tag(tmp_path, tokenizer):
    assert align_word_labels([None, 0, 1, 1, 2, None], [5, 6, 7]) == [IGNORE_INDEX, 5, 6, IGNORE_INDEX, 7, IGNORE_INDEX]
    cfg = write_splits(
        tmp_path, "ner", {"train": [{"tokens": ["Zorblax", "visited", "Oslo"], "tags": ["B-PER", "O", "B-LOC"]}]}
    )
    sample = build_token_classification_split(cfg, "train", tokenizer)[0]
    labelled = [
        (tokenizer.convert_ids_to_tokens(t), l)
        for t, l in zip(sample["input_ids"], sample["labels"])
        if l != IGNORE_INDEX
    ]
    assert [l for _, l in labelled] == [1, 2, 0]  # B-LOC=0, B-PER=1, O=2
    assert labelled[0][0] == tokenizer.tokenize("Zorblax")[0] and len(tokenizer.tokenize("Zorblax")) > 1
    cfg = write_splits(tmp_path, "bad", {"train": [{"tokens": ["a", "b"], "tags": ["O"]}]})
    with pytest.raises(UserInputError, match=r"bad_train\.json: line 1: 2 tokens but 1 tags"):
        build_token_classification_split(cfg, "train", tokenizer)


def test_qa_answer_offsets_become_token_spans(tmp_path, tokenizer):
    context = "Maria lives in New Oslo. Tom works at Delta Labs."
    record = {
        "context": context,
        "question": "Where does Tom work?",
        "answers": {"text": ["Delta Labs"], "answer_start": [context.index("Delta")]},
    }
    cfg = write_splits(tmp_path, "qa", {"train": [record]})
    sample = build_question_answering_split(cfg, "train", tokenizer)[0]
    span = sample["input_ids"][sample["start_positions"] : sample["end_positions"] + 1]
    assert tokenizer.decode(span) == "delta labs"
    cfg.sequence_length = 12  # the answer is cut off: the sample cannot be trained on
    assert build_question_answering_split(cfg, "train", tokenizer)[0]["start_positions"] == -1
    bad = dict(record, answers={"text": ["Delta"], "answer_start": [3]})
    cfg = write_splits(tmp_path, "badqa", {"train": [bad]})
    with pytest.raises(UserInputError, match=r"answer 'Delta' is not in the context at answer_start 3"):
        build_question_answering_split(cfg, "train", tokenizer)


def test_text_pairs_keep_their_groups(tmp_path, tokenizer):
    cfg = write_splits(
        tmp_path,
        "pairs",
        {
            "train": [
                {"text": "a", "text_pair": "b", "group": "x"},
                {"text": "c", "text_pair": "d", "group": "y"},
                {"text": "e", "text_pair": "f", "group": "x"},
            ]
        },
    )
    samples = build_text_pairs_split(cfg, "train", tokenizer)
    assert [s["group"] for s in samples] == [0, 1, 0]
    assert samples[1]["pair_input_ids"] == tokenizer("d")["input_ids"]


def test_entity_spans_and_f1():
    assert entity_spans(["B-PER", "I-PER", "O", "B-LOC", "I-ORG"]) == {("PER", 0, 1), ("LOC", 3, 3), ("ORG", 4, 4)}
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    assert entity_f1(gold, gold) == 1.0
    assert entity_f1(gold, [["B-PER", "O", "O", "B-LOC"]]) == pytest.approx(0.5)  # 1 of 2 found, 1 of 2 right
    assert entity_f1(gold, [["O"] * 4]) == 0.0


def test_qa_span_choice_and_squad_scores():
    start = torch.tensor([0.0, 5.0, 1.0, 0.0, 8.0])
    end = torch.tensor([9.0, 0.0, 4.0, 3.0, 0.0])
    assert best_span(start, end, first=1, last=4) == (1, 2)  # end must not precede start; token 0 is outside
    assert normalize("The  Delta, Labs!") == "delta labs"
    assert f1_score("Delta Labs Oslo", "the Delta Labs") == pytest.approx(0.8)
