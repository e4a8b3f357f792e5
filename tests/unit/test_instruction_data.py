"""Instruction records: prompt masking token by token, templates, and bad files."""

import json

import pytest
from transformers import AutoTokenizer

from fairseq_ext.data.instruction import IGNORE_INDEX, read_instruction_records, tokenize_instruction
from fairseq_ext.data.prompts import PROMPT_TEMPLATES, PromptTemplate, get_prompt_template, register_prompt_template
from fairseq_ext.errors import UserInputError
from tests.helpers import MODEL_DIR


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


def test_prompt_tokens_are_masked_and_answer_tokens_kept(tokenizer):
    prompt = get_prompt_template("alpaca").render("What is the last word?", "cat dog owl")
    sample = tokenize_instruction(tokenizer, prompt, "owl")
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer("owl", add_special_tokens=False)["input_ids"]
    assert sample["input_ids"] == prompt_ids + answer_ids + [tokenizer.eos_token_id]
    assert sample["input_ids"][0] == tokenizer.bos_token_id
    for position, (token, label) in enumerate(zip(sample["input_ids"], sample["labels"])):
        if position < len(prompt_ids):
            assert label == IGNORE_INDEX, f"prompt token {position} is trained on"
        else:
            assert label == token, f"answer token {position} is not trained on"
    trained = [t for t in sample["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "owl</s>"


def test_alpaca_template_switches_on_input():
    template = get_prompt_template("alpaca")
    with_input = template.render("Copy the words.", "cat dog")
    without = template.render("Say hi.", "")
    assert "### Input:\ncat dog" in with_input and with_input.endswith("### Response:\n")
    assert "### Input:" not in without and "### Instruction:\nSay hi." in without


def test_user_template_registry():
    register_prompt_template(
        "test_qa", PromptTemplate(with_input="Q: {instruction} C: {input} A:", without_input="Q: {instruction} A:")
    )
    try:
        assert get_prompt_template("test_qa").render("why?", "") == "Q: why? A:"
        with pytest.raises(UserInputError, match="already registered"):
            register_prompt_template("test_qa", PromptTemplate("", ""))
    finally:
        PROMPT_TEMPLATES.pop("test_qa")
    with pytest.raises(UserInputError, match="unknown PROMPT_TYPE 'nope'.*alpaca"):
        get_prompt_template("nope")


def test_json_list_and_json_lines_are_both_read(tmp_path):
    records = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "output": "d"}]
    (tmp_path / "list_train.json").write_text(json.dumps(records))
    (tmp_path / "lines_train.json").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    for name in ("list", "lines"):
        got = read_instruction_records(str(tmp_path), name, "train")
        assert [(r["instruction"], r["output"]) for r in got] == [("a", "b"), ("c", "d")]


@pytest.mark.parametrize(
    "content, message",
    [
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n',
            r"bad_train\.json:2: malformed JSON line",
        ),
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n',
            r"bad_train\.json: line 2: record is missing field 'output'",
        ),
        ('{"instruction": "a", "output": 3}\n', r"bad_train\.json: line 1: field 'output' must be a string"),
        ("\n\n", r"bad_train\.json: the split is empty"),
        ('[{"instruction": "a", "output": "b"}, 3]', r"bad_train\.json: item 1 of the JSON list is not an object"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, content, message):
    (tmp_path / "bad_train.json").write_text(content)
    with pytest.raises(UserInputError, match=message):
        read_instruction_records(str(tmp_path), "bad", "train")


def test_missing_file(tmp_path):
    with pytest.raises(UserInputError, match="no such file"):
        read_instruction_records(str(tmp_path), "absent", "train")
