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


BATCH_RECORDS = [
    {"instruction": "Copy the words.", "input": "cat dog  owl", "output": "cat dog owl"},
    {"instruction": "Say hi.", "input": None, "output": "hi"},
    {"instruction": "Say nothing.", "input": "", "output": ""},
    {"instruction": " Spaces around ", "input": "\tTabs\nand lines\n", "output": "  two leading spaces"},
    {"instruction": "Ünïcode: naïve café, 你好, émoji 🙂", "input": "Ωmega", "output": "ça va"},
    {"instruction": "Special tokens as text: </s> <s> [SEP] [CLS]", "input": "<pad>", "output": "[SEP] </s>"},
]


def _tokenizers():
    from transformers import AutoTokenizer

    from tests.helpers import EXAMPLE, minilm_folder

    minilm = AutoTokenizer.from_pretrained(minilm_folder())
    minilm.eos_token = "[SEP]"
    return {
        "llama-bpe-bos": AutoTokenizer.from_pretrained(MODEL_DIR),
        "t5-eos-appended": AutoTokenizer.from_pretrained(EXAMPLE / "model" / "tiny-t5"),
        "bert-wordpiece-cls-sep": minilm,
    }


@pytest.mark.parametrize("name", ["llama-bpe-bos", "t5-eos-appended", "bert-wordpiece-cls-sep"])
def test_batched_samples_are_those_of_one_record_at_a_time(tmp_path, name):
    """The batched map (backend encode_batch_fast, Arrow columns) gives exactly tokenize_instruction's samples."""
    import types

    from fairseq_ext.data.encode import _plain_backend
    from fairseq_ext.data.instruction import build_instruction_split

    tok = _tokenizers()[name]
    assert _plain_backend(tok), "the fast path is not taken for a plain Rust tokenizer"
    (tmp_path / "toy_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in BATCH_RECORDS))
    for prompt_type in ("alpaca", "plain"):
        cfg = types.SimpleNamespace(data=str(tmp_path), dataset_name="toy", prompt_type=prompt_type)
        got = build_instruction_split(cfg, "train", tok)
        template = get_prompt_template(prompt_type)
        expected = [
            tokenize_instruction(tok, template.render(r["instruction"], r["input"] or ""), r["output"])
            for r in BATCH_RECORDS
        ]
        assert got.features["input_ids"].feature.dtype == "int32"
        assert list(got["input_ids"]) == [e["input_ids"] for e in expected]
        assert list(got["labels"]) == [e["labels"] for e in expected]


def test_the_encoder_resets_the_backend_as_the_tokenizer_does(tokenizer):
    """A truncation or padding left on the backend is dropped, as ``tokenizer(texts)`` drops it."""
    from fairseq_ext.data.encode import BatchEncoder

    texts = ["a longer text than three tokens", "b"]
    expected = tokenizer(texts)["input_ids"]
    tokenizer.backend_tokenizer.enable_truncation(3)
    tokenizer.backend_tokenizer.enable_padding(length=12)
    assert BatchEncoder(tokenizer)(texts, True) == expected
    assert tokenizer.backend_tokenizer.truncation is None and tokenizer.backend_tokenizer.padding is None


def test_a_tokenizer_with_python_steps_is_called_itself():
    """A tokenizer class that rewrites texts in Python is not bypassed."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    from fairseq_ext.data.encode import BatchEncoder, _plain_backend

    class Shouting(type(_tokenizers()["llama-bpe-bos"])):
        def _encode_plus(self, text, *args, **kwargs):
            return TokenizersBackend._encode_plus(self, [t.upper() for t in text], *args, **kwargs)

    tok = Shouting.from_pretrained(MODEL_DIR)
    assert not _plain_backend(tok)
    assert BatchEncoder(tok)(["quiet words"], False) == tok(["QUIET WORDS"], add_special_tokens=False)["input_ids"]


def _fuzz_texts(count: int = 400, seed: int = 0):
    """ASCII texts over all 128 characters and mixed case, some with added tokens' text or non-ASCII."""
    import random

    rng = random.Random(seed)
    pieces = [
        "Hello",
        "WORLD",
        "QQZZ",
        "qqzz",
        "naïve",
        "你好",
        "[SEP]",
        "[sep]",
        "[CLS]",
        "<s>",
        "</s>",
        "[MASK]",
        "  ",
        "\t",
        "\n",
    ]
    pieces += ["\r\n", "\x0b", "\x0c", "\x00", "\x7f", "\x1f", "a.b", "x,y!", "#1", "can't", "e\u0301", "\ufffd"]
    texts = []
    for _ in range(count):
        if rng.random() < 0.5:  # printable ASCII and whitespace, one text in five with any of the 128
            alphabet = 128 if rng.random() < 0.2 else [9, 10, 13, *range(32, 127)]
            codes = rng.choices(range(alphabet) if alphabet == 128 else alphabet, k=rng.randrange(40))
            texts.append("".join(map(chr, codes)))
        else:
            texts.append(" ".join(rng.choice(pieces) for _ in range(rng.randrange(12))))
    return texts


@pytest.mark.parametrize(
    "normalizer",
    ["bert", "bert, split on spaces only", "bert-cased-no-clean", "nfkc-lowercase", "nfc", "replace (not known)"],
)
def test_ascii_texts_normalized_in_python_give_the_tokenizers_ids(normalizer):
    """Texts the encoder normalizes itself (ASCII, no control characters, no added token's text) get exactly
    the ids of ``tokenizer(texts)``; so do all the others, which go through the backend."""
    from tokenizers import AddedToken, normalizers, pre_tokenizers

    from fairseq_ext.data.encode import BatchEncoder

    tok = _tokenizers()["bert-wordpiece-cls-sep"]
    backend = tok.backend_tokenizer
    backend.normalizer = {
        "bert": backend.normalizer,
        "bert, split on spaces only": backend.normalizer,
        "bert-cased-no-clean": normalizers.BertNormalizer(clean_text=False, lowercase=False),
        "nfkc-lowercase": normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]),
        "nfc": normalizers.NFC(),
        "replace (not known)": normalizers.Replace("a", "b"),
    }[normalizer]
    if normalizer == "bert, split on spaces only":  # tabs and newlines stay inside the pieces
        backend.pre_tokenizer = pre_tokenizers.Split(" ", "removed")
    tok.add_tokens([AddedToken("qqzz", normalized=False)])  # matched in the raw text, not in "QQZZ" lowercased
    encoder = BatchEncoder(tok)
    assert (encoder.unnormalized is None) == (normalizer == "replace (not known)")
    # word by word where the pre-tokenizer is BERT's
    assert (encoder.words is None) == (normalizer in ("replace (not known)", "bert, split on spaces only"))
    texts = _fuzz_texts()
    if encoder.unnormalized is not None:  # both paths are taken
        simple = sum(encoder._ascii_normalized(t) is not None for t in texts)
        assert 100 < simple < len(texts) - 100
    for add_special_tokens in (True, False):
        expected = tok(texts, add_special_tokens=add_special_tokens)["input_ids"]
        assert encoder(texts, add_special_tokens) == expected
        assert encoder.rows(texts, add_special_tokens).to_lists() == expected
        if encoder.unnormalized is None:
            continue
        ascii_only = [t for t in texts if encoder._ascii_normalized(t) is not None]
        assert (
            encoder.rows(ascii_only, add_special_tokens).to_lists()
            == tok(ascii_only, add_special_tokens=add_special_tokens)["input_ids"]
        )


def test_word_by_word_ids_are_the_tokenizers_for_long_and_split_words_and_a_restarted_table(monkeypatch):
    """Words longer than WordPiece's limit ([UNK]), words of several pieces, digits, empty and blank texts:
    the ids of ``tokenizer(texts)``, on a first call, a second (remembered words) and after the table of
    remembered words started over."""
    from fairseq_ext.data import word_ids
    from fairseq_ext.data.encode import BatchEncoder

    tok = _tokenizers()["bert-wordpiece-cls-sep"]
    encoder = BatchEncoder(tok)
    assert encoder.words is not None
    texts = [
        "x" * 101 + " " + "y" * 100,
        "Tokenization of unbelievably antidisestablishmentarianism",
        "3.14159 and 2,718 (e) -- 1e10!!",
        "",
        "   ",
        "\tab\t...end.",
        " lead and trail ",
    ]
    for restart_after in (word_ids.MAX_WORDS, 3):
        monkeypatch.setattr(word_ids, "MAX_WORDS", restart_after)
        for add_special_tokens in (True, False, True):
            expected = tok(texts, add_special_tokens=add_special_tokens)["input_ids"]
            assert encoder.rows(texts, add_special_tokens).to_lists() == expected
    assert len(encoder.words.known) <= 3 + 30  # started over when it held more than 3 words


def test_a_word_path_that_differs_on_the_probes_is_not_taken(monkeypatch):
    """Should the special tokens found around a text be wrong, the probes show it: the backend tokenizes the
    normalized texts as it did before, with the same ids."""
    from fairseq_ext.data import encode

    tok = _tokenizers()["bert-wordpiece-cls-sep"]
    monkeypatch.setattr(encode, "affixes", lambda backend: ([], []))  # forgets [CLS] and [SEP]
    encoder = encode.BatchEncoder(tok)
    assert encoder.words is None and encoder.unnormalized is not None
    texts = _fuzz_texts(100)
    assert encoder.rows(texts, True).to_lists() == tok(texts)["input_ids"]


def test_rows_are_joined_row_by_row():
    """join_rows: row i of the result is row i of each part in order, empty rows and gathered starts included."""
    import numpy as np

    from fairseq_ext.data.word_ids import Rows, join_rows

    a = Rows(np.array([3, 0, 1]), np.array([2, 0, 3]), np.arange(10, 15, dtype=np.int32))
    b = Rows(np.array([0, 0, 0]), np.array([1, 1, 0]), np.array([7], dtype=np.int32))
    assert join_rows([a, b, a]).to_pylist() == [[13, 14, 7, 13, 14], [7], [11, 12, 13, 11, 12, 13]]
    assert a.to_lists() == [[13, 14], [], [11, 12, 13]]


def test_two_processes_give_the_samples_of_one(tmp_path, monkeypatch):
    """Large data is tokenized by one process per core (the encoder pickled into each): the same samples."""
    import types

    from fairseq_ext.data import preprocess
    from fairseq_ext.data.instruction import build_instruction_split

    tok = _tokenizers()["bert-wordpiece-cls-sep"]
    records = [dict(r, output=f"{r['output']} {i}") for i in range(8) for r in BATCH_RECORDS]
    samples = {}
    for processes in (1, 2):
        monkeypatch.setattr(preprocess, "MIN_RECORDS_PER_PROCESS", 10 if processes == 2 else 10**9)
        monkeypatch.setattr(preprocess.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
        folder = tmp_path / str(processes)
        folder.mkdir()
        (folder / "toy_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        cfg = types.SimpleNamespace(data=str(folder), dataset_name="toy", prompt_type="alpaca")
        samples[processes] = build_instruction_split(cfg, "train", tok)
    assert len(samples[2].cache_files) == 2  # one Arrow file per process
    assert list(samples[2]["input_ids"]) == list(samples[1]["input_ids"])
    assert list(samples[2]["labels"]) == list(samples[1]["labels"])


def test_an_ascii_path_that_differs_on_the_probes_is_not_taken(monkeypatch):
    """Should the steps said for a normalizer be wrong, the probe texts show it and the backend is used."""
    from fairseq_ext.data import encode

    tok = _tokenizers()["bert-wordpiece-cls-sep"]
    assert encode.BatchEncoder(tok).unnormalized is not None
    monkeypatch.setattr(encode, "ascii_steps", lambda spec: [])  # forgets BERT's lowercasing
    encoder = encode.BatchEncoder(tok)
    assert encoder.unnormalized is None
    texts = _fuzz_texts(100)
    assert encoder(texts, True) == tok(texts)["input_ids"]
