"""--pack-sequences through fairseq-train: packed rows train, and heads other than the causal LM refuse it."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from fairseq_ext.models.hf_loading import load_hf_model
from fairseq_ext.safe_load import load_checkpoint_file
from tests.helpers import DATA_DIR, MODEL_DIR, fairseq_train, minilm_folder, tiny_train_args, train_losses


def test_packed_training_runs_and_learns(tmp_path):
    # a cache of its own: the packing (and its log line) happens where the cache is built, and another run may
    # have built the shared one already
    args = ["--pack-sequences", "--sequence-length", "128", "--batch-size", "2", "--lr", "3e-3"]
    args += ["--data-cache-dir", str(tmp_path / "cache")]
    result = fairseq_train(tiny_train_args(tmp_path, max_update=8, extra=args))
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    packed = re.search(r"split train: packed (\d+) samples into (\d+) rows of up to 128 tokens", log)
    assert packed and int(packed.group(2)) * 4 < int(packed.group(1)), log[-3000:]
    losses = train_losses(result.stdout)
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1] - 0.5, losses


@pytest.mark.parametrize("flag, variable", [("--pack-sequences", "PACK_SEQUENCES"), ("--padding-free", "PADDING_FREE")])
def test_packing_a_classification_head_is_one_clear_error(tmp_path, flag, variable):
    args = tiny_train_args(
        tmp_path,
        max_update=1,
        extra=[
            flag,
            "--arch",
            "hf_auto_seq_cls_lm",
            "--hf-model-name-or-path",
            minilm_folder(),
            "--dataset-type",
            "classification",
            "--dataset-name",
            "toy_sentiment",
        ],
    )
    result = fairseq_train(args)
    assert result.returncode != 0
    assert f"{variable}=1 " in result.stderr and "the seq_cls head of --arch hf_auto_seq_cls_lm" in result.stderr
    assert f"set {variable}=0" in result.stderr
    assert "Traceback" not in result.stderr


def _first_update(tmp_path, name, pack, flags=()):
    """fairseq-train, one SGD update (lr 1) over a batch holding every sample: the weights it moves."""
    data = tmp_path / "data"
    if not data.is_dir():
        data.mkdir()
        lines = (DATA_DIR / "toy_instructions_train.json").read_text().splitlines()
        for split in ("train", "valid"):
            (data / f"toy_instructions_{split}.json").write_text("\n".join(lines[:40]) + "\n")
    args = ["--sequence-length", "64", "--batch-size", "64", "--optimizer", "sgd", "--lr", "1.0"]
    args += [
        "--warmup-updates",
        "0",
        "--no-epoch-checkpoints",
        *(["--pack-sequences"] if pack else []),
        *map(str, flags),
    ]
    result = fairseq_train(tiny_train_args(tmp_path / name, data_dir=data, max_update=1, extra=args))
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert ("packed 40 samples into" in log) == pack, log[-2000:]
    weights = load_checkpoint_file(tmp_path / name / "checkpoint_last.pt")["model"]
    return weights, train_losses(result.stdout)[1]


@pytest.fixture(scope="module")
def padded_update(tmp_path_factory):
    """(weights, loss, speed log) of the padded update both tests below compare with: one run for the two."""
    folder = tmp_path_factory.mktemp("padded")
    log = folder / "padded.jsonl"
    return (*_first_update(folder, "padded", pack=False, flags=["--speed-log", log]), log)


def test_packed_rows_train_as_unpacked_rows_through_fairseq_train(tmp_path, padded_update):
    """One update over the same 40 samples, padded (SDPA) or packed into rows (document_varlen attention,
    per document on the CPU): the same loss and the same gradient (the SGD step), 1e-5 relative."""
    start = load_hf_model(AutoModelForCausalLM, str(MODEL_DIR), init_seed=3).state_dict()
    unpacked, unpacked_loss, _ = padded_update
    packed, packed_loss = _first_update(tmp_path, "packed", pack=True)
    assert packed_loss == unpacked_loss
    for name, weight in start.items():
        want, got = unpacked[f"hf_model.{name}"] - weight, packed[f"hf_model.{name}"] - weight
        assert want.norm() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=name)


def test_padding_free_batches_train_as_padded_batches_through_fairseq_train(tmp_path, padded_update):
    """One update over the same 40 samples, padded (SDPA with a padding mask) or padding-free (``--padding-free``:
    the batch as one row of its samples, document_varlen attention): the same loss and gradient, 1e-5 relative."""
    start = load_hf_model(AutoModelForCausalLM, str(MODEL_DIR), init_seed=3).state_dict()
    padded, padded_loss, padded_log = padded_update
    logs = {"padded": padded_log, "free": tmp_path / "free.jsonl"}
    free, free_loss = _first_update(tmp_path, "free", pack=False, flags=["--padding-free", "--speed-log", logs["free"]])
    assert free_loss == padded_loss
    # the tokens computed, padding included: the padding-free batch has none
    tokens = {name: json.loads(log.read_text().splitlines()[0])["tokens"] for name, log in logs.items()}
    assert tokens["free"] < tokens["padded"], tokens
    for name, weight in start.items():
        want, got = padded[f"hf_model.{name}"] - weight, free[f"hf_model.{name}"] - weight
        assert want.norm() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=name)
