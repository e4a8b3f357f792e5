"""DATASET_TYPE=chat beyond the causal head in one process: the seq2seq head (the encoder reads the conversation up
to the last assistant turn, the decoder learns that turn, as evaluation asks for it), LoRA, and a tensor-parallel
plan (tp2 with LoRA gives the one-process LoRA run's losses), each through run.sh on 64 shipped conversations."""

import pytest
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from fairseq_ext.data.chat import conversation, prompt_and_answer, render, tokenize_conversation
from fairseq_ext.data.chat_templates import resolve_chat_template
from fairseq_ext.data.layouts import IGNORE_INDEX, get_layout
from fairseq_ext.errors import UserInputError
from fairseq_ext.evaluation.generation import chat_exact_match
from fairseq_ext.models.hf_loading import load_hf_model
from tests.distributed.test_plan_run_sh import full_precision_losses
from tests.helpers import DATA_DIR, EXACT_LOSS_USER_DIR, EXAMPLE
from tests.integration.test_run_sh import run_sh

T5_DIR = EXAMPLE / "model" / "tiny-t5"
CONVERSATION = {
    "messages": [
        {"role": "system", "content": "You answer questions about a list of words."},
        {"role": "user", "content": "Words: bear ice milk gold goat"},
        {"role": "assistant", "content": "five words."},
        {"role": "user", "content": "Repeat the first word two times."},
        {"role": "assistant", "content": "bear bear"},
    ]
}
SETTINGS = dict(
    USER_DIR=EXACT_LOSS_USER_DIR,
    DATASET_TYPE="chat",
    MAX_STEPS=3,
    SAVE_STEPS=3,
    WARMUP_STEPS=1,
    BATCH_SIZE=4,
    LOG_FORMAT="json",
    LOG_INTERVAL=1,
)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat_data")
    for split, count in (("train", 64), ("valid", 16), ("test", 16)):
        lines = (DATA_DIR / f"toy_chat_{split}.json").read_text().splitlines(keepends=True)[:count]
        (folder / f"toy_chat_{split}.json").write_text("".join(lines))
    return folder


def test_seq2seq_chat_sample_is_the_evaluation_prompt_and_the_last_answer():
    tokenizer = AutoTokenizer.from_pretrained(T5_DIR)
    template = resolve_chat_template("", tokenizer)  # no template of its own: ChatML
    turns = conversation(CONVERSATION)
    row = get_layout("seq2seq_lm").prepare(tokenize_conversation(tokenizer, template, turns))
    prompt_turns, answer = prompt_and_answer(turns)
    prompt = render(tokenizer, template, prompt_turns, add_generation_prompt=True)
    assert row["input_ids"] == tokenizer(prompt, add_special_tokens=False)["input_ids"]  # what evaluation encodes
    trained = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(trained, skip_special_tokens=True).startswith(answer), tokenizer.decode(trained)
    assert "five words." in tokenizer.decode(row["input_ids"])  # the earlier answer is context, not trained
    everything = tokenize_conversation(tokenizer, template, turns, train_on_all_turns=True)
    with pytest.raises(UserInputError, match="TRAIN_ON_ALL_TURNS=1"):
        get_layout("seq2seq_lm").prepare(everything)


def test_chat_exact_match_decodes_with_an_encoder_decoder():
    tokenizer = AutoTokenizer.from_pretrained(T5_DIR)
    model = load_hf_model(AutoModelForSeq2SeqLM, str(T5_DIR)).eval()
    template = resolve_chat_template("", tokenizer)
    metric = chat_exact_match(model, tokenizer, [conversation(CONVERSATION)] * 2, template, max_new_tokens=4)
    assert metric.total == 2 and len(metric.examples) == 2 and "(expected 'bear bear')" in metric.examples[0]


def test_chat_with_the_seq2seq_head_trains(tmp_path, chat_data):
    result = run_sh(tmp_path, MODEL_ARCH="hf_auto_seq2seq_lm", DATASET_PATH=chat_data, EVALUATE=0, **SETTINGS)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "split train: 64 samples; 0 truncated to SEQUENCE_LENGTH=512, 0 dropped" in result.stdout
    assert sorted(full_precision_losses(result.stdout)) == [1, 2, 3]


def test_chat_with_lora_under_tp2_matches_one_process(tmp_path, chat_data):
    lora = dict(USE_LORA=1, EVALUATE=0, DATASET_PATH=chat_data, **SETTINGS)
    one = run_sh(tmp_path / "one", **lora)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    tp2 = run_sh(tmp_path / "tp2", NPROC_PER_NODE=2, PLAN_NGPUS=2, **lora)
    assert tp2.returncode == 0, tp2.stdout[-2000:] + tp2.stderr[-3000:]
    assert '"tp": 2' in tp2.stdout + (tmp_path / "tp2" / "out" / "log" / "train.log").read_text()
    expected, got = full_precision_losses(one.stdout), full_precision_losses(tp2.stdout)
    assert sorted(expected) == sorted(got) == [1, 2, 3]
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= 1e-5 * abs(loss), (step, got[step], loss)
    assert expected[3] < expected[1], expected  # the adapters train
