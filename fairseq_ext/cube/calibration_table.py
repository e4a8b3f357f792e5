"""The calibration table: the cost model's predictions against measured runs (benchmarks/plan_calibration.py)."""

import math
from typing import Optional, Sequence


def predicted_vs_measured(rows: Sequence[dict]) -> str:
    """The calibration table: each row holds a plan's ``name``, ``predicted_gib``, ``measured_gib``
    (``torch.cuda.max_memory_allocated`` / 2**30) and optionally ``predicted_s`` and ``measured_s`` (seconds
    per update) and ``group`` (the settings a search holds fixed: plans of one group are alternatives).
    Returns the table as text, with the memory error per row and whether the predicted step times rank the
    plans of each group as the measured ones do. Issue 5 asks for memory within 5%."""
    lines = [f"{'plan':<44} {'pred GiB':>9} {'meas GiB':>9} {'error':>7} {'pred s':>8} {'meas s':>8} {'error':>7}"]
    for row in rows:
        error = (row["predicted_gib"] - row["measured_gib"]) / row["measured_gib"]
        time_error = _time_error(row)
        lines.append(
            f"{row['name']:<44} {row['predicted_gib']:9.2f} {row['measured_gib']:9.2f} {error:+7.1%} "
            f"{row.get('predicted_s', math.nan):8.3f} {row.get('measured_s', math.nan):8.3f} "
            f"{time_error if time_error is not None else math.nan:+7.1%}"
        )
    groups = {}
    for row in rows:
        if "predicted_s" in row and "measured_s" in row:
            groups.setdefault(row.get("group", ""), []).append(row)
    for group, timed in sorted(groups.items()):
        if len(timed) > 1:
            same = sorted(timed, key=lambda r: r["predicted_s"]) == sorted(timed, key=lambda r: r["measured_s"])
            lines.append(
                f"step-time ranking {'matches' if same else 'DIFFERS from'} the measured one"
                + (f" among {len(timed)} plans of {group}" if group else "")
            )
    worst = max(abs(r["predicted_gib"] - r["measured_gib"]) / r["measured_gib"] for r in rows) if rows else 0.0
    lines.append(f"largest memory error {worst:.1%} ({'within' if worst <= 0.05 else 'outside'} 5%)")
    time_errors = [abs(e) for e in map(_time_error, rows) if e is not None]
    if time_errors:
        lines.append(f"largest step-time error {max(time_errors):.1%}")
    return "\n".join(lines)


def _time_error(row: dict) -> Optional[float]:
    if "predicted_s" not in row or "measured_s" not in row:
        return None
    return (row["predicted_s"] - row["measured_s"]) / row["measured_s"]
