"""Every head through run.sh with only MODEL_ARCH set (and a short run): the loss falls and the test metric
of the shipped data rises well above its value before training. The causal LM is test_run_sh's default run."""

import json
import re

import pytest

from tests.helpers import DATA_DIR, train_losses
from tests.integration.test_run_sh import run_sh

# arch -> (short-run settings, metric, least gain in percentage points). Measured on the shipped data (200 test
# records): seq2seq 300 updates exact match 0.0% -> 15.0%, seq_cls 40 updates accuracy 33.0% -> 98.0%,
# token_cls 30 updates entity F1 7.7% -> 62.8%, qa 40 updates exact match 2.5% -> 30.5% (F1 19.5% -> 40.6%):
# a head that does not learn stays near its "before".
HEADS = {
    "hf_auto_seq2seq_lm": ({"MAX_STEPS": 300, "WARMUP_STEPS": 20}, "exact match", 10.0),
    "hf_auto_seq_cls_lm": ({"MAX_STEPS": 40, "WARMUP_STEPS": 5}, "accuracy", 30.0),
    "hf_auto_token_cls_lm": ({"MAX_STEPS": 30, "WARMUP_STEPS": 3}, "entity F1", 30.0),
    "hf_auto_qa_lm": ({"MAX_STEPS": 40, "WARMUP_STEPS": 5}, "exact match", 15.0),
    "hf_auto_lm": ({"MAX_STEPS": 60, "WARMUP_STEPS": 10}, "recall@1", 30.0),
}


def metric(stdout: str, name: str, label: str) -> float:
    found = re.search(rf"^test {re.escape(name)} \({label}\): (?:\d+/\d+ = )?([\d.]+)%$", stdout, re.M)
    assert found, stdout[-3000:]
    return float(found.group(1))


@pytest.mark.parametrize("arch", list(HEADS))
def test_head_learns_its_shipped_task(tmp_path, arch):
    settings, name, gain = HEADS[arch]
    # one validation and checkpoint, at the end: the metric is measured on the test split after training
    result = run_sh(
        tmp_path, MODEL_ARCH=arch, LOG_FORMAT="json", LOG_INTERVAL=5, SAVE_STEPS=settings["MAX_STEPS"], **settings
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = train_losses(result.stdout)
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < 0.7 * first, losses
    before, after = metric(result.stdout, name, "before"), metric(result.stdout, name, "after")
    assert after > before + gain, (before, after)


def test_unknown_model_arch_is_one_clear_error(tmp_path):
    result = run_sh(tmp_path, MODEL_ARCH="hf_auto_causal")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.search(
        r"run\.sh: error: unknown MODEL_ARCH 'hf_auto_causal'; choose hf_auto_causal_lm, .*hf_auto_lm", result.stderr
    ), result.stderr


def test_label_sets_that_disagree_between_splits_are_one_clear_error(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid", "test"):
        lines = (DATA_DIR / f"toy_sentiment_{split}.json").read_text().splitlines()[:20]
        if split == "test":
            lines.append(json.dumps({"text": "The lamp is sublime.", "label": "ecstatic"}))
        (data / f"toy_sentiment_{split}.json").write_text("\n".join(lines) + "\n")
    result = run_sh(tmp_path, MODEL_ARCH="hf_auto_seq_cls_lm", DATA_DIR=data, MAX_STEPS=2)
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    assert re.search(
        r"fairseq_ext: error: the label sets of the splits disagree: split test has labels \['ecstatic'\] "
        r"that train does not have",
        result.stderr,
    ), result.stderr
