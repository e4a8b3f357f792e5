"""Chat records: assistant-only labels under real chat-template styles, the built-in ChatML, bad records."""

import json
import types

import pytest
from transformers import AutoTokenizer

from fairseq_ext.data.chat import build_chat_split, conversation, render, tokenize_conversation
from fairseq_ext.data.chat_templates import CHATML, ChatTemplate, end_of_turn, resolve_chat_template
from fairseq_ext.data.layouts import IGNORE_INDEX
from fairseq_ext.errors import UserInputError
from tests.helpers import MODEL_DIR, REPO

TEMPLATES = REPO / "tests" / "assets" / "chat_templates"
# template file -> what it writes right after the assistant's words, and whether it has a system role
STYLES = {
    "llama3.jinja": ("<|eot_id|>", True),
    "qwen2.jinja": ("<|im_end|>", True),
    "gemma.jinja": ("<end_of_turn>", False),
    "mistral.jinja": ("</s>", False),
}
SYSTEM = {"role": "system", "content": "You answer in one word."}
TURNS = [
    {"role": "user", "content": "Words: cat dog owl"},
    {"role": "assistant", "content": "three words."},
    {"role": "user", "content": "What is the second word?"},
    {"role": "assistant", "content": "dog"},
    {"role": "user", "content": "And the last?"},
    {"role": "assistant", "content": "owl"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


def trained_spans(sample):
    """Runs of consecutive trained positions, as lists of token ids."""
    spans, current = [], []
    for token, label in zip(sample["input_ids"], sample["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


@pytest.mark.parametrize("name", sorted(STYLES))
@pytest.mark.parametrize("with_system", [False, True])
def test_assistant_only_labels_match_the_rendered_turns(tokenizer, name, with_system):
    marker, has_system = STYLES[name]
    if with_system and not has_system:
        pytest.skip("this template has no system role (its refusal is tested below)")
    template = resolve_chat_template(str(TEMPLATES / name), tokenizer)
    turns = [SYSTEM, *TURNS] if with_system else TURNS
    sample = tokenize_conversation(tokenizer, template, turns)
    text = render(tokenizer, template, turns)
    assert tokenizer.decode(sample["input_ids"]) == text
    spans = [tokenizer.decode(span).strip() for span in trained_spans(sample)]
    assert spans == [t["content"] + marker for t in turns if t["role"] == "assistant"]
    for t in turns:
        if t["role"] != "assistant":
            assert all(t["content"] not in span for span in spans)
    if with_system:
        assert SYSTEM["content"] in text
    everything = tokenize_conversation(tokenizer, template, turns, train_on_all_turns=True)
    assert everything["labels"] == everything["input_ids"] == sample["input_ids"]


def test_chatml_is_the_default_without_a_template_and_marks_generation(tokenizer):
    assert tokenizer.chat_template is None
    template = resolve_chat_template("", tokenizer)
    assert template.text == CHATML and template.has_generation_markers
    assert resolve_chat_template("chatml", tokenizer).text == CHATML
    sample = tokenize_conversation(tokenizer, template, [SYSTEM, *TURNS])
    spans = [tokenizer.decode(span) for span in trained_spans(sample)]
    assert spans == ["three words.<|im_end|>", "dog<|im_end|>", "owl<|im_end|>"]
    # the same template without its markers: assistant turns found by rendering turn by turn
    plain = ChatTemplate(CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", ""), "plain chatml")
    found = [
        tokenizer.decode(span) for span in trained_spans(tokenize_conversation(tokenizer, plain, [SYSTEM, *TURNS]))
    ]
    assert found == [s + "\n" for s in spans]
    assert end_of_turn(tokenizer, template) == "<|im_end|>"
    assert end_of_turn(tokenizer, resolve_chat_template(str(TEMPLATES / "llama3.jinja"), tokenizer)) == "<|eot_id|>"


def test_sharegpt_records_and_their_system_field():
    record = {
        "system": "Be brief.",
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
    }
    assert conversation(record) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]


def write(tmp_path, records, name="talk"):
    path = tmp_path / f"{name}_train.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def cfg(tmp_path, chat_template="", name="talk"):
    return types.SimpleNamespace(
        data=str(tmp_path), dataset_name=name, chat_template=chat_template, train_on_all_turns=False
    )


GOOD = {"messages": TURNS[:2]}


@pytest.mark.parametrize(
    "bad, template, message",
    [
        ({"text": "hi"}, "", r"record 2: record has neither 'messages'"),
        ({"messages": []}, "", r"record 2: 'messages' must be a non-empty list"),
        (
            {"messages": [{"role": "wizard", "content": "hi"}, TURNS[1]]},
            "",
            r"record 2: turn 1 has unknown role 'wizard'",
        ),
        (
            {"messages": [TURNS[0], {"role": "assistant", "content": "  "}]},
            "",
            r"record 2: turn 2 \(assistant\) has an empty",
        ),
        (
            {"messages": [TURNS[0], TURNS[0], TURNS[1]]},
            "mistral.jinja",
            r"record 2: the chat template \(.*mistral.jinja\) raised TemplateError: Conversation roles must alternate",
        ),
        (
            {"messages": [SYSTEM, *TURNS[:2]]},
            "gemma.jinja",
            r"record 2: the chat template \(.*gemma.jinja\) raised TemplateError: System role not supported",
        ),
    ],
)
def test_each_bad_record_is_one_error_naming_file_and_record(tmp_path, tokenizer, bad, template, message):
    good = {"messages": [{"role": "user", "content": "Words: cat dog"}, {"role": "assistant", "content": "two words."}]}
    if bad.get("text"):
        good = {**good, "text": None}
    write(tmp_path, [good, bad])
    chosen = str(TEMPLATES / template) if template else ""
    with pytest.raises(UserInputError, match=r"talk_train\.json: " + message):
        build_chat_split(cfg(tmp_path, chosen), "train", tokenizer)


def test_unknown_chat_template_names_the_choices(tmp_path, tokenizer):
    with pytest.raises(UserInputError, match="CHAT_TEMPLATE 'vicuna' is neither a built-in template \\(chatml\\)"):
        resolve_chat_template("vicuna", tokenizer)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", "_list.json"])
def test_chat_split_from_every_file_format(tmp_path, tokenizer, suffix):
    import datasets

    records = [{"messages": TURNS}, {"messages": TURNS[:2]}]
    if suffix == ".parquet":
        datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "talk_train.parquet"))
    elif suffix == ".jsonl":
        (tmp_path / "talk_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        (tmp_path / "talk_train.json").write_text(json.dumps(records, indent=1))
    samples = build_chat_split(cfg(tmp_path), "train", tokenizer)
    expected = [tokenize_conversation(tokenizer, resolve_chat_template("", tokenizer), r["messages"]) for r in records]
    assert [list(x) for x in samples["labels"]] == [e["labels"] for e in expected]
    assert [list(x) for x in samples["input_ids"]] == [e["input_ids"] for e in expected]


def test_chat_samples_pack(tmp_path, tokenizer):
    from fairseq_ext.data.packing import pack

    write(tmp_path, [{"messages": TURNS}, {"messages": [SYSTEM, *TURNS[:2]]}, {"messages": TURNS[:4]}])
    samples = build_chat_split(cfg(tmp_path), "train", tokenizer)
    packed = pack(samples, 512, "train")
    assert len(packed) == 1
    row = packed[0]
    assert sum(len(ids) for ids in samples["input_ids"]) == len(row["input_ids"])
    assert sorted(t for t in row["labels"] if t != IGNORE_INDEX) == sorted(
        t for labels in samples["labels"] for t in labels[1:] if t != IGNORE_INDEX
    )
