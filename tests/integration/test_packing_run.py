"""--pack-sequences through fairseq-train: packed rows train, and heads other than the causal LM refuse it."""

import re

from tests.helpers import fairseq_train, minilm_folder, tiny_train_args, train_losses


def test_packed_training_runs_and_learns(tmp_path):
    args = ["--pack-sequences", "--sequence-length", "128", "--batch-size", "2", "--lr", "3e-3"]
    result = fairseq_train(tiny_train_args(tmp_path, max_update=8, extra=args))
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    packed = re.search(r"split train: packed (\d+) samples into (\d+) rows of up to 128 tokens", log)
    assert packed and int(packed.group(2)) * 4 < int(packed.group(1)), log[-3000:]
    losses = train_losses(result.stdout)
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1] - 0.5, losses


def test_packing_a_classification_head_is_one_clear_error(tmp_path):
    args = tiny_train_args(
        tmp_path,
        max_update=1,
        extra=[
            "--pack-sequences",
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
    assert "PACK_SEQUENCES=1 packs causal LM samples; the seq_cls head" in result.stderr
    assert "Traceback" not in result.stderr
