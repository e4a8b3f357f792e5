"""run.sh: the shipped default visibly learns; bad input gets one clear line and a non-zero exit."""

import json
import re
import shutil
import socket
import sys

import pytest

from tests.helpers import DATA_DIR, RUN_SH, fairseq_train, run, tiny_train_args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sh(tmp_path, timeout=900, args=(), **variables):
    # CPU and gloo on every machine: several processes cannot share one GPU through NCCL
    settings = {
        "OUTPUT_DIR": str(tmp_path / "out"),
        "MASTER_PORT": str(free_port()),
        "PYTHON": sys.executable,
        "CUDA_VISIBLE_DEVICES": "",
    }
    settings.update({k: str(v) for k, v in variables.items()})
    return run(["bash", RUN_SH, *args], timeout=timeout, extra_env=settings)


def exact_match(stdout: str, label: str) -> float:
    found = re.search(rf"test exact match \({label}\): \d+/\d+ = ([\d.]+)%", stdout)
    assert found, stdout[-3000:]
    return float(found.group(1))


def test_default_run_learns_the_shipped_task(tmp_path):
    """run.sh with no settings but the output folder and MAX_STEPS=1000 (half the default's updates: README's
    timing row; the default's model, data, learning rate and warmup) trains and reports a large, real
    improvement: 0.0% -> 78.5% measured, where 600 updates reach 49.0%."""
    result = run_sh(tmp_path, timeout=1200, MAX_STEPS=1000)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "fairseq_ext run.sh settings:" in result.stdout and "MAX_STEPS" in result.stdout
    before, after = exact_match(result.stdout, "before"), exact_match(result.stdout, "after")
    assert before < 5.0 and after > before + 50.0, (before, after)
    assert (tmp_path / "out" / "checkpoint" / "checkpoint_best.pt").is_file()
    assert list((tmp_path / "out" / "tensorboard" / "valid").glob("events.out.tfevents.*"))
    assert (tmp_path / "out" / "log" / "train.log").is_file()


def write_data(folder, splits):
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        content = splits.get(split, (DATA_DIR / f"toy_instructions_{split}.json").read_text())
        (folder / f"toy_instructions_{split}.json").write_text(content)
    return folder


GOOD = json.dumps({"instruction": "What is the first word?", "input": "cat owl", "output": "cat"}) + "\n"

BAD_INPUTS = {
    "malformed JSON line": (
        {"DATA_DIR": {"train": GOOD + '{"instruction": "x", \n'}},
        r"toy_instructions_train\.json:2: malformed JSON line",
    ),
    "malformed train file, evaluation on": (
        {"DATA_DIR": {"train": GOOD + '{"instruction": "x", \n'}, "EVALUATE": 1},
        r"toy_instructions_train\.json:2: malformed JSON line",
    ),
    "missing field": (
        {"DATA_DIR": {"valid": GOOD + json.dumps({"instruction": "x", "input": ""}) + "\n"}},
        r"toy_instructions_valid\.json: line 2: record is missing field 'output'",
    ),
    "empty split": ({"DATA_DIR": {"train": ""}}, r"toy_instructions_train\.json: the split is empty"),
    "unknown PROMPT_TYPE": ({"PROMPT_TYPE": "alpacca"}, r"unknown PROMPT_TYPE 'alpacca'; registered templates: alpaca"),
    "unknown DATASET_TYPE": (
        {"DATASET_TYPE": "jsonl"},
        r"unknown DATASET_TYPE 'jsonl'; registered types: chat, classification, disk, instruction",
    ),
    "missing model path": (
        {"HUGGINGFACE_MODEL_NAME_OR_PATH": "no-such-org/no-such-model"},
        r"model 'no-such-org/no-such-model' is not a local folder and is not in the Hugging Face "
        r"cache; runs are offline",
    ),
    "BATCH_SIZE zero": ({"BATCH_SIZE": "0"}, r"run\.sh: error: BATCH_SIZE must be a positive integer, got '0'"),
    "MAX_STEPS not a number": ({"MAX_STEPS": "ten"}, r"run\.sh: error: MAX_STEPS must be a positive integer"),
    "unknown LORA_CONFIG key": (
        {"USE_LORA": "1", "LORA_CONFIG": "rank=4"},
        r"LORA_CONFIG has unknown keys \['rank'\]; peft.LoraConfig accepts",
    ),
    "USE_LORA not 0/1": ({"USE_LORA": "yes"}, r"run\.sh: error: USE_LORA must be 0 or 1, got 'yes'"),
    "BATCH_SIZE negative": ({"BATCH_SIZE": "-4"}, r"BATCH_SIZE must be a positive integer, got '-4'"),
    "unknown PRECISION": (
        {"PRECISION": "fp4"},
        r"run\.sh: error: PRECISION must be fp32, bf16, bf16-master, bf16-lean, fp8, fp8-lean or fp16, got 'fp4'",
    ),
    "PRECISION=fp8 on the CPU": (
        {"PRECISION": "fp8"},
        r"PRECISION=fp8 multiplies in float8 on NVIDIA GPUs of compute capability 8\.9 or newer \(Ada, Hopper\); "
        r"this run is on the CPU: use PRECISION=bf16-master",
    ),
    "COMPILE not 0/1": ({"COMPILE": "yes"}, r"run\.sh: error: COMPILE must be 0 or 1, got 'yes'"),
    "PADDING_FREE not 0/1": ({"PADDING_FREE": "2"}, r"run\.sh: error: PADDING_FREE must be 0 or 1, got '2'"),
    "MAX_TOKENS with BATCH_SIZE": (
        {"MAX_TOKENS": "256", "BATCH_SIZE": "4"},
        r"run\.sh: error: set BATCH_SIZE \(samples per batch\) or MAX_TOKENS \(tokens per batch\), not both; "
        r"got BATCH_SIZE=4 and MAX_TOKENS=256",
    ),
    "USE_ZERO not a level": (
        {"USE_ZERO": "4"},
        r"run\.sh: error: USE_ZERO must be a ZeRO level 0, 1, 2 or 3, got '4'",
    ),
    "SEQUENCE_PARALLEL not 0/1": (
        {"SEQUENCE_PARALLEL": "on"},
        r"run\.sh: error: SEQUENCE_PARALLEL must be 0 or 1, got 'on'",
    ),
    "PROFILE_UPDATES not a range": (
        {"PROFILE_UPDATES": "8-10"},
        r"run\.sh: error: PROFILE_UPDATES must be FIRST:LAST updates counted from 1, e\.g\. "
        r"8:10, got '8-10'",
    ),
    "unknown CHECKPOINT_FORMAT": (
        {"CHECKPOINT_FORMAT": "sharded"},
        r"run\.sh: error: CHECKPOINT_FORMAT must be auto, full or dcp, got 'sharded'",
    ),
    "SEQUENCE_LENGTH beyond the model": (
        {"SEQUENCE_LENGTH": "1024"},
        r"SEQUENCE_LENGTH 1024 exceeds the model's max_position_embeddings 512; "
        r"set SEQUENCE_LENGTH to at most 512",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_one_clear_error(tmp_path, case):
    variables, message = BAD_INPUTS[case]
    # no evaluation before training unless the case asks for it: it would only delay the error
    variables = dict(variables, MAX_STEPS=variables.get("MAX_STEPS", 4), EVALUATE=variables.get("EVALUATE", 0))
    if "DATA_DIR" in variables:
        variables["DATA_DIR"] = write_data(tmp_path / "data", variables["DATA_DIR"])
    result = run_sh(tmp_path, **variables)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert re.search(message, result.stderr), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert len([line for line in result.stderr.splitlines() if "error:" in line]) == 1, result.stderr
    assert not list((tmp_path / "out").rglob("*.pt")), "a checkpoint was written for a run that never started"
    assert "(before)" not in result.stdout, "the model was evaluated before its training data was read"


def test_fairseq_train_itself_prints_one_line_for_bad_input(tmp_path):
    data = write_data(tmp_path / "data", {"train": "[1, 2]"})
    result = fairseq_train(tiny_train_args(tmp_path / "ck", data_dir=data))
    assert result.returncode != 0
    assert "fairseq_ext: error:" in result.stderr and "item 0 of the JSON list is not an object" in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_through_run_sh_skips_before_evaluation(tmp_path):
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    first = run_sh(tmp_path, MAX_STEPS=4, EVALUATE=0, BATCH_SIZE=4)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_sh(tmp_path, MAX_STEPS=8, BATCH_SIZE=4, SAVE_STEPS=4)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Loaded checkpoint" in second.stdout and "num_updates 8" in second.stdout.replace("=", " ")
    assert "(before)" not in second.stdout and "test exact match (after)" in second.stdout


def test_default_output_folder_is_one_per_arch_and_dataset(tmp_path):
    """Without OUTPUT_DIR, checkpoints, logs and TensorBoard files go to
    $SCRIPT_PATH/$MODEL_ARCH/$DATASET_TYPE-$DATASET_NAME: a chat run does not resume the instruction run."""
    result = run_sh(tmp_path, OUTPUT_DIR="", SCRIPT_PATH=tmp_path / "runs", MAX_STEPS=2, EVALUATE=0, BATCH_SIZE=4)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = tmp_path / "runs" / "hf_auto_causal_lm" / "instruction-toy_instructions"
    assert (out / "checkpoint" / "checkpoint_last.pt").is_file() and (out / "log" / "train.log").is_file()
    chat = run_sh(
        tmp_path, OUTPUT_DIR="", SCRIPT_PATH=tmp_path / "runs", DATASET_TYPE="chat", EVALUATE=0, args=["--help"]
    )
    assert chat.returncode == 0, chat.stderr[-2000:]  # fairseq-train's help: the settings are printed before it
    assert (
        f"OUTPUT_DIR                       {tmp_path / 'runs' / 'hf_auto_causal_lm' / 'chat-toy_chat'}" in chat.stdout
    )


def test_token_budget_batches_and_the_precision_chosen_for_the_cpu(tmp_path):
    """MAX_TOKENS batches hold at most that many tokens (fairseq's --max-tokens); with PRECISION unset on the
    CPU the run is fp32, and the printed settings say it was chosen."""
    result = run_sh(
        tmp_path, MAX_TOKENS=300, SEQUENCE_LENGTH=64, MAX_STEPS=3, EVALUATE=0, LOG_FORMAT="json", LOG_INTERVAL=1
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PRECISION fp32 chosen (PRECISION unset, no GPU with bf16)" in result.stdout
    assert re.search(r"MAX_TOKENS +300", result.stdout)
    records = [
        json.loads(line.split("| train_inner |", 1)[1])
        for line in result.stdout.splitlines()
        if "| train_inner |" in line
    ]
    assert len(records) == 3, result.stdout[-3000:]
    # a batch of bsz samples padded to its longest: at most 300 tokens; more samples than a short sample's 32
    assert all(float(r["bsz"]) * 8 > 32 for r in records), records
    train_log = (tmp_path / "out" / "log" / "train.log").read_text()
    assert "'max_tokens': 300" in train_log and "'precision': 'fp32'" in train_log
