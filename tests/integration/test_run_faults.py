"""run.sh against faults and bad input: a finished run stays finished (full and sharded checkpoints), and
every bad input ends in a few lines with a non-zero exit, leaving an earlier finished run's files as they were.

Two tiny finished runs (2 updates each, one per checkpoint format) are made once for the module; every
test then starts run.sh again on them, or beside them, and compares their files byte by byte.
"""

import errno
import hashlib
import os
import re
import shutil

import pytest
import torch

from fairseq_ext import errors
from fairseq_ext.cube.sharded_checkpoint import read_checkpoint
from fairseq_ext.errors import LOG_DIR_VARIABLE, UserInputError
from tests.helpers import DATA_DIR, MODEL_DIR, build_trainer, tiny_train_args
from tests.integration.test_run_sh import run_sh

SETTINGS = {"MAX_STEPS": 2, "SAVE_STEPS": 1, "BATCH_SIZE": 4, "EVALUATE": 0, "LOG_INTERVAL": 1}


def digests(folder):
    """{relative path: sha256} of every file under ``folder``."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """{checkpoint format: the folder holding run.sh's OUTPUT_DIR ``out``} of two finished runs."""
    runs = {}
    for checkpoint_format in ("full", "dcp"):
        folder = tmp_path_factory.mktemp(checkpoint_format)
        result = run_sh(folder, CHECKPOINT_FORMAT=checkpoint_format, **SETTINGS)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        runs[checkpoint_format] = folder
    return runs


def test_a_finished_run_stays_finished(finished):
    """(That a larger MAX_STEPS trains on from such a run is test_run_sh.py's resume test.)"""
    for checkpoint_format, folder in finished.items():
        before = digests(folder / "out" / "checkpoint")
        assert any(name.endswith(".dcp/.metadata") for name in before) == (checkpoint_format == "dcp"), before
        again = run_sh(folder, CHECKPOINT_FORMAT=checkpoint_format, **SETTINGS)
        assert again.returncode == 0, again.stderr[-3000:]
        assert (
            "the run is complete: " in again.stdout
            and "is at update 2 and --max-update (MAX_STEPS) is 2" in again.stdout
        ), again.stdout[-3000:]
        assert "train_inner" not in again.stdout and "Saved checkpoint" not in again.stdout
        assert digests(folder / "out" / "checkpoint") == before, checkpoint_format


# ---- bad input: library errors translated where they arise ----


def model_copy(folder, **files):
    """The shipped tiny Llama's folder copied to ``folder`` with ``files`` ({name: bytes}) written into it."""
    shutil.copytree(MODEL_DIR, folder)
    for name, content in files.items():
        (folder / name.replace("__", ".")).write_bytes(content)
    return folder


def data_copy(folder, **splits):
    """The shipped instruction data copied to ``folder`` with ``splits`` ({split: bytes}) replaced."""
    folder.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        content = splits.get(split, (DATA_DIR / f"toy_instructions_{split}.json").read_bytes())
        (folder / f"toy_instructions_{split}.json").write_bytes(content)
    return folder


NOT_UTF8 = b'{"instruction": "caf\xe9", "input": "", "output": "x"}\n'

# name: (a function of tmp_path giving fairseq-train's extra arguments and a data folder, the error's pattern)
IN_PROCESS = {
    "data: not UTF-8": (
        lambda t: ([], data_copy(t / "d", train=NOT_UTF8)),
        r"toy_instructions_train\.json:1: bytes that are not UTF-8 \(b'\\xe9'.*save the file as UTF-8",
    ),
    "data: a split missing": (
        lambda t: ([], data_copy(t / "d", valid=b"")),
        r"toy_instructions_valid\.json: the split is empty",
    ),
    "model: corrupt model.safetensors": (
        lambda t: (["--hf-model-name-or-path", str(model_copy(t / "m", model__safetensors=b"\xff" * 64))], DATA_DIR),
        r"could not load the weights of .*SafetensorError.*copy or download them again",
    ),
    "model: truncated model.safetensors": (
        lambda t: (
            [
                "--hf-model-name-or-path",
                str(model_copy(t / "m", model__safetensors=b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')),
            ],
            DATA_DIR,
        ),
        r"could not load the weights of ",
    ),
    "model: config.json not JSON": (
        lambda t: (["--hf-model-name-or-path", str(model_copy(t / "m", config__json=b"{not json"))], DATA_DIR),
        r"config\.json' is not a valid JSON file",
    ),
    "tokenizer: tokenizer.json not JSON": (
        lambda t: (["--hf-model-name-or-path", str(model_copy(t / "m", tokenizer__json=b"{not json"))], DATA_DIR),
        r"could not load a tokenizer from ",
    ),
    "LoRA: r negative (peft's ValueError)": (
        lambda t: (["--use-lora", "--lora-config", '{"r": -4}'], DATA_DIR),
        r"LORA_CONFIG is not valid for this model: peft says: `r` should be a "
        r"positive",
    ),
    "LoRA: target module absent": (
        lambda t: (["--use-lora", "--lora-config", "target_modules=qkv"], DATA_DIR),
        r"LORA_CONFIG target_modules 'qkv' match no module of the model",
    ),
    "LoRA: not JSON": (
        lambda t: (["--use-lora", "--lora-config", '{"r": 4'], DATA_DIR),
        r"LORA_CONFIG is not valid JSON",
    ),
    "plan: file not JSON": (lambda t: (["--plan-file", str(t / "plan.json")], DATA_DIR), r"plan\.json"),
}


def build_in_process(args):
    """fairseq-train's setup up to its first update's inputs: flags, task, data, model."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from fairseq_ext.cube.config import plan_from_config

    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), args))
    task = tasks.setup_task(cfg.task)
    task.build_model(cfg.model)
    for split in ("train", "valid"):
        task.load_dataset(split)
    plan_from_config(cfg.task, world_size=1, gpus_per_node=1)


@pytest.mark.parametrize("case", list(IN_PROCESS))
def test_library_errors_become_one_line(tmp_path, case):
    make, pattern = IN_PROCESS[case]
    (tmp_path / "plan.json").write_text("{tp: 2")
    extra, data = make(tmp_path)
    with pytest.raises(UserInputError, match=pattern) as raised:
        build_in_process(tiny_train_args(tmp_path / "ck", data_dir=data, extra=extra))
    assert "\n" not in str(raised.value) and len(str(raised.value)) < 600, str(raised.value)


def test_unexpected_errors_are_one_line_naming_their_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(LOG_DIR_VARIABLE, str(tmp_path / "log"))
    try:
        {}["missing"]
    except KeyError as err:
        errors._excepthook(type(err), err, err.__traceback__)
    err = capsys.readouterr().err
    log = tmp_path / "log" / "traceback.log"
    assert err.strip() == f"fairseq_ext: error: unexpected KeyError: 'missing' (the full traceback is in {log})"
    assert "Traceback (most recent call last)" in log.read_text() and '{}["missing"]' in log.read_text()


# run.sh: the 4 errors users met, and the checkpoint faults, on the finished run (its files must not change)
RUN_SH_CASES = {
    "data not UTF-8": (
        lambda t: {"DATA_DIR": data_copy(t / "d", valid=NOT_UTF8)},
        r"toy_instructions_valid\.json:1: bytes that are not UTF-8",
    ),
    "corrupt model.safetensors": (
        lambda t: {"HUGGINGFACE_MODEL_NAME_OR_PATH": model_copy(t / "m", model__safetensors=b"\xff" * 64)},
        r"could not load the weights of .*header too large",
    ),
    "LORA_CONFIG r -4": (
        lambda t: {"USE_LORA": 1, "LORA_CONFIG": '{"r": -4}'},
        r"peft says: `r` should be a positive integer value but the value passed is -4",
    ),
    "OPTIMIZE_PARAMS --lr abc": (
        lambda t: {"OPTIMIZE_PARAMS": "--optimizer adam --lr abc"},
        r"fairseq-train: error: argument --lr: invalid .* value: 'abc' \(OPTIMIZE_PARAMS",
    ),
}


def test_run_sh_bad_input_leaves_a_finished_run_alone(finished, tmp_path):
    out = finished["full"] / "out"
    before = digests(out / "checkpoint")
    for case, (make, pattern) in RUN_SH_CASES.items():
        variables = {**SETTINGS, "MAX_STEPS": 3, **make(tmp_path / case.replace(" ", "_"))}
        result = run_sh(finished["full"], CHECKPOINT_FORMAT="full", **variables)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode != 0, case
        assert len(lines) <= 3 and "Traceback" not in result.stderr, (case, result.stderr[-3000:])
        assert re.search(pattern, result.stderr), (case, result.stderr[-3000:])
        assert digests(out / "checkpoint") == before, case


# ---- checkpoint faults ----


def test_a_truncated_checkpoint_names_the_newest_intact_one(finished, tmp_path):
    shutil.copytree(finished["full"] / "out" / "checkpoint", tmp_path / "ck")
    last = tmp_path / "ck" / "checkpoint_last.pt"
    last.write_bytes(last.read_bytes()[:4096])
    with pytest.raises(
        UserInputError,
        match=rf"{last} is damaged or cut short \(RuntimeError: .*\); the newest intact "
        rf"checkpoint is {tmp_path / 'ck' / 'checkpoint_1_2.pt'} \(update 2\)",
    ):
        read_checkpoint(str(last))


def test_a_failed_save_keeps_the_previous_checkpoints(tmp_path, monkeypatch):
    """A save that runs out of space (simulated: torch.save writes part of the file, then fails with ENOSPC)
    stops with one message and leaves the checkpoint written before it byte for byte."""
    from fairseq import checkpoint_utils

    trainer, _ = build_trainer(tmp_path, cpu=True)
    epoch_itr = trainer.get_train_iterator(epoch=1)
    epoch_itr.next_epoch_itr(shuffle=False)
    checkpoint_utils.save_checkpoint(trainer.cfg.checkpoint, trainer, epoch_itr, None)  # the patched save
    before = digests(tmp_path)
    assert "checkpoint_last.pt" in before

    real_save = torch.save

    def no_space(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the bytes go out, the disk fills before the end
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(
        UserInputError,
        match=rf"could not write a checkpoint into {tmp_path} \(OSError: .*No space "
        r"left on device\); the previous checkpoints there are intact",
    ):
        checkpoint_utils.save_checkpoint(trainer.cfg.checkpoint, trainer, epoch_itr, None)
    assert digests(tmp_path) == before
