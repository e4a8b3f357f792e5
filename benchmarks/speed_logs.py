"""What a run of run.sh left in its logs: the per-update records of its SPEED_LOG and their medians, the last
loss fairseq logged, and the error line of a failed run."""

import json
import re
import statistics
from pathlib import Path
from typing import List, Optional, Tuple

GIB = 2**30
TAIL_LINES = 25
# A line that ends a traceback or states run.sh's / fairseq_ext's one-line error (torchrun may prefix [rankN]: ).
ERROR_LINE = re.compile(r"^(\[rank\d+\]: )?(run\.sh: error:|fairseq_ext: error:|[\w.]*(Error|Exception|Interrupt)\b)")


def read_speed_log(path: Path) -> List[dict]:
    """The records of a SPEED_LOG file, by update. A line that is not JSON (a run killed mid-write) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return sorted(records, key=lambda r: r["update"])


def summarize_speed_log(records: List[dict], warmup: int) -> dict:
    """Medians over the updates after the first ``warmup`` (updates are numbered from 1).

    Returns tokens_per_s (median of per-update tokens / step_s), step_median_s, compute_median_s,
    bookkeeping_share (median(step_s - compute_s) / median(step_s)), peak_alloc_gib and peak_reserved_gib
    (the last record's peaks; None where the log has none, e.g. on a CPU) and timed_updates.
    Raises ValueError when no update is left after the warm-up.
    """
    records = sorted(records, key=lambda r: r["update"])
    timed = [r for r in records if r["update"] > warmup]
    if not timed:
        raise ValueError(f"the speed log has {len(records)} updates, none after the {warmup} warm-up updates")
    step = [float(r["step_s"]) for r in timed]
    compute = [float(r["compute_s"]) for r in timed]
    last = records[-1]
    peak = last.get("peak_allocated_bytes")
    reserved = last.get("peak_reserved_bytes")
    return dict(
        tokens_per_s=statistics.median(r["tokens"] / r["step_s"] for r in timed),
        step_median_s=statistics.median(step),
        compute_median_s=statistics.median(compute),
        bookkeeping_share=statistics.median(s - c for s, c in zip(step, compute)) / statistics.median(step),
        peak_alloc_gib=None if peak is None else peak / GIB,
        peak_reserved_gib=None if reserved is None else reserved / GIB,
        tokens_per_update=statistics.median(r["tokens"] for r in timed),
        trained_tokens_per_s=statistics.median(r["trained_tokens"] / r["step_s"] for r in timed)
        if all("trained_tokens" in r for r in timed)
        else None,
        timed_updates=len(timed),
        step_s=step,
        compute_s=compute,
    )


def last_loss(log: Path) -> Optional[float]:
    """The last train_inner loss fairseq logged (LOG_FORMAT=json), a sanity check that training ran."""
    loss = None
    try:
        lines = Path(log).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        if "| train_inner |" in line:
            try:
                loss = float(json.loads(line.split("| train_inner |", 1)[1])["loss"])
            except (ValueError, KeyError):
                continue
    return loss


def failure_excerpt(log: Path, at_error: bool = True, lines: int = TAIL_LINES) -> Tuple[str, str]:
    """(the last error line, the ``lines`` log lines ending with it) of a failed run; ('', the last lines)
    when it has no error line or not ``at_error`` (a run killed at its timeout). A worker's exception comes
    before torchrun's own ChildFailedError report, which says nothing about it."""
    try:
        text = Path(log).read_text(errors="replace").splitlines()
    except OSError:
        return "", ""
    errors = [
        i for i, line in enumerate(text) if at_error and ERROR_LINE.match(line) and "ChildFailedError" not in line
    ]
    end = errors[-1] + 1 if errors else len(text)
    return (text[errors[-1]].strip() if errors else ""), "\n".join(text[max(0, end - lines) : end])
