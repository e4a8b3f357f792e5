"""benchmarks/lm_loss_speed.py on the CPU: the criterion's chunk, and a tiny run whose variants agree with the
float32 reference and whose table is written."""

import json
import sys

import torch

from fairseq_ext.cube.runtime.chunked_loss import chunk_rows
from tests.helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import lm_loss_speed  # noqa: E402


def test_the_chunked_variant_runs_the_criterions_chunk():
    assert chunk_rows(32000) == 4194 and chunk_rows(128256) == 1046 and chunk_rows(10**6) == 512


def test_a_tiny_run_agrees_with_the_float32_reference_and_writes_its_table(tmp_path):
    shape = dict(lm_loss_speed.TINY["tiny"], tokens=1200)  # three chunks of 512 rows, one ragged
    rows = lm_loss_speed.run({"tiny": shape}, torch.device("cpu"), reps=1)
    assert {"tiny chunked", "tiny plain"} <= set(rows)
    for row in rows.values():
        assert row["finite"] and row["loss"] < 1e-5  # float32 sums of bf16 logits
        assert row["grad_hidden"] < 1e-2 and row["grad_head"] < 1e-2  # bf16 gradients
    assert lm_loss_speed.main(["--tiny", "--reps", "1", "--out", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "lm_loss_speed.json").read_text())
    assert set(written["results"]) == {"tiny chunked", "tiny plain"}
    assert "| tiny chunked |" in (tmp_path / "lm_loss_speed.md").read_text()


def test_a_failing_variant_is_recorded_and_the_others_still_run(monkeypatch):
    def broken(h, w, t):
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setattr(lm_loss_speed, "variants", lambda vocab: {"broken": broken, "plain": lm_loss_speed.plain})
    rows = lm_loss_speed.run(lm_loss_speed.TINY, torch.device("cpu"), reps=1)
    assert rows["tiny broken"] == {"error": "RuntimeError: no kernel for this shape"}
    assert rows["tiny plain"]["finite"]
    assert "| tiny broken | failed: RuntimeError: no kernel for this shape |" in lm_loss_speed.table(rows)
