"""``--profile-updates A:B`` (run.sh ``PROFILE_UPDATES``): ``torch.profiler`` over updates A to B of the run.

Each rank writes into ``--profile-dir``:

- ``trace_rank<R>.json.gz``: the Chrome trace (open it in Perfetto or ``chrome://tracing``);
- ``kernels_rank<R>.md`` and ``.json``: device time by kind of work (matrix multiplies, attention, fused
  compiled kernels, elementwise, reductions, optimizer, communication, copies), its share, the milliseconds
  per update, the kernels that took the most time and, on a GPU, the operators whose kernels took the most
  time, by input shapes (which tells a LoRA adapter's matmul from its base layer's), and the time the GPU
  had no kernel running between the first and the last kernel (idle), with the longest such gaps.

On a GPU the time is the CUDA kernels' own time; on a CPU-only run it is the operators' own CPU time. Kinds
are read from kernel and operator names, the only thing both carry.
"""

import gzip
import json
import logging
import os
import re
import shutil
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import UserInputError

logger = logging.getLogger(__name__)

# (kind, pattern over the lower-cased kernel or operator name); the first match wins.
KINDS: List[Tuple[str, re.Pattern]] = [
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("communication", r"nccl|gloo|c10d::|allreduce|all_reduce|allgather|reduce_scatter|broadcast"),
        ("copy", r"memcpy|memset|direct_copy|aten::copy_|aten::to\b|aten::_to_copy|cat_array|catarray"),
        ("optimizer", r"multi_tensor_apply|foreach|adam"),
        ("attention", r"flash|fmha|attention|attn|sdpa|scaled_dot_product"),
        ("matmul", r"gemm|nvjet|cutlass|cublas|xmma|matmul|aten::mm\b|aten::addmm|aten::bmm|aten::linear|splitk"),
        ("compiled (fused)", r"^triton_|triton"),
        ("reduction", r"reduce|norm|softmax|sum\b|aten::sum|aten::mean|aten::max|log_softmax|nll_loss|cross_entropy"),
        (
            "elementwise",
            r"elementwise|vectorized|unrolled|aten::(add|mul|sub|div|silu|neg|cos|sin|exp|pow|rsqrt|where|fill)",
        ),
    )
]
OTHER = "other"
TRACE_KERNEL_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")  # GPU work in a Chrome trace (not annotations)
TOP_KERNELS = 25
TOP_GAPS = 10


def parse_updates(text: str) -> Optional[Tuple[int, int]]:
    """``A:B`` (or ``A``, one update) as the first and last update to profile, counted from 1; empty: None.

    Raises:
        UserInputError: anything else.
    """
    text = (text or "").strip()
    if not text:
        return None
    match = re.fullmatch(r"(\d+)(?::(\d+))?", text)
    first, last = (int(match.group(1)), int(match.group(2) or match.group(1))) if match else (0, 0)
    if not match or first < 1 or last < first:
        raise UserInputError(
            f"--profile-updates (PROFILE_UPDATES) takes FIRST:LAST updates counted from 1, e.g. 8:10, got {text!r}"
        )
    return first, last


def kind_of(name: str) -> str:
    """The kind of work a kernel or operator name stands for (one of :data:`KINDS`, or ``other``)."""
    lowered = name.lower()
    for kind, pattern in KINDS:
        if pattern.search(lowered):
            return kind
    return OTHER


def summarize(
    times_us: Dict[str, float],
    updates: int,
    device: str,
    op_times_us: Optional[Dict[str, float]] = None,
    idle: Optional[dict] = None,
) -> dict:
    """Device time of each kernel (name -> microseconds over ``updates`` updates) grouped by kind; with
    ``op_times_us`` (operator and input shapes -> microseconds of the kernels it launched), its top too;
    with ``idle`` (:func:`trace_idle`), the GPU's idle time per update and its longest gaps."""
    total = sum(times_us.values()) or 1.0
    kinds: Dict[str, float] = defaultdict(float)
    for name, us in times_us.items():
        kinds[kind_of(name)] += us
    per_update = max(updates, 1) * 1000.0
    idle_part = {}
    if idle is not None:
        idle_part = {
            "span_ms_per_update": idle["span_us"] / per_update,
            "idle_ms_per_update": idle["idle_us"] / per_update,
            "idle_share": idle["idle_us"] / (idle["span_us"] or 1.0),
            "longest_gaps": [dict(gap, ms=gap["us"] / 1000.0) for gap in idle["gaps"]],
        }
    return {
        **idle_part,
        "device": device,
        "updates": updates,
        "total_ms_per_update": total / per_update,
        "kinds": [
            {"kind": kind, "ms_per_update": us / per_update, "share": us / total}
            for kind, us in sorted(kinds.items(), key=lambda item: -item[1])
        ],
        "top": [
            {"name": name, "kind": kind_of(name), "ms_per_update": us / per_update, "share": us / total}
            for name, us in sorted(times_us.items(), key=lambda item: -item[1])[:TOP_KERNELS]
        ],
        "top_operators": [
            {"name": name, "ms_per_update": us / per_update, "share": us / total}
            for name, us in sorted((op_times_us or {}).items(), key=lambda item: -item[1])[:TOP_KERNELS]
        ],
    }


def summary_markdown(summary: dict) -> str:
    """The summary as Markdown tables."""
    what = "CUDA kernels' own time" if summary["device"] == "cuda" else "operators' own CPU time"
    lines = [
        f"# Profile of {summary['updates']} update(s): {what}, {summary['total_ms_per_update']:.1f} ms per update",
        "",
        "| kind | ms per update | share |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {k['kind']} | {k['ms_per_update']:.2f} | {k['share']:.1%} |" for k in summary["kinds"]]
    if "idle_ms_per_update" in summary:
        lines += [
            "",
            f"GPU idle (no kernel running) between the first and the last kernel: "
            f"{summary['idle_ms_per_update']:.2f} ms per update of {summary['span_ms_per_update']:.1f} "
            f"({summary['idle_share']:.1%}).",
            "",
            "| longest gaps: ms | after kernel | before kernel |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {g['ms']:.3f} | `{g['after'][:70]}` | `{g['before'][:70]}` |" for g in summary["longest_gaps"]]
    lines += ["", "| kernel | kind | ms per update | share |", "| --- | --- | --- | --- |"]
    lines += [
        f"| `{t['name'][:120]}` | {t['kind']} | {t['ms_per_update']:.2f} | {t['share']:.1%} |" for t in summary["top"]
    ]
    if summary.get("top_operators"):
        lines += ["", "| operator [input shapes] (own kernels) | ms per update | share |", "| --- | --- | --- |"]
        lines += [
            f"| `{t['name'][:160]}` | {t['ms_per_update']:.2f} | {t['share']:.1%} |" for t in summary["top_operators"]
        ]
    return "\n".join(lines) + "\n"


def _own_times(profiler, cuda: bool) -> Dict[str, float]:
    """Own time (microseconds) of each kernel (GPU) or operator (CPU), by name."""
    times: Dict[str, float] = defaultdict(float)
    for event in profiler.key_averages():
        if getattr(event, "is_user_annotation", False):
            continue  # a named range (record_function) on the GPU's timeline, not a kernel
        if cuda:
            if event.device_type == torch.autograd.DeviceType.CUDA and event.self_device_time_total > 0:
                times[event.key] += event.self_device_time_total
        elif event.self_cpu_time_total > 0 and not event.key.startswith("ProfilerStep"):
            times[event.key] += event.self_cpu_time_total
    return times


def trace_kernel_times(trace: dict) -> Dict[str, float]:
    """Own time (microseconds) of each GPU kernel, copy and memset in a Chrome trace, by name."""
    times: Dict[str, float] = defaultdict(float)
    for event in trace.get("traceEvents", []):
        if event.get("cat") in TRACE_KERNEL_CATEGORIES and event.get("ph") == "X":
            times[event["name"]] += float(event.get("dur", 0))
    return times


def trace_idle(trace: dict) -> dict:
    """When the GPU ran no kernel, copy or memset in a Chrome trace, between its first and last one.

    Returns ``span_us`` (first start to last end), ``idle_us`` (the span less the union of the kernels'
    intervals, over all streams) and ``gaps``: the :data:`TOP_GAPS` longest idle gaps, each with ``us`` and
    the names of the kernels that ended before it (``after``) and started after it (``before``).
    """
    kernels = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e["name"])
        for e in trace.get("traceEvents", [])
        if e.get("cat") in TRACE_KERNEL_CATEGORIES and e.get("ph") == "X" and "ts" in e
    )
    if not kernels:
        return {"span_us": 0.0, "idle_us": 0.0, "gaps": []}
    gaps = []
    busy_until, last_name = kernels[0][1], kernels[0][2]
    for start, end, name in kernels[1:]:
        if start > busy_until:
            gaps.append({"us": start - busy_until, "after": last_name, "before": name})
        if end >= busy_until:
            busy_until, last_name = end, name
    span = busy_until - kernels[0][0]
    return {
        "span_us": span,
        "idle_us": sum(gap["us"] for gap in gaps),
        "gaps": sorted(gaps, key=lambda gap: -gap["us"])[:TOP_GAPS],
    }


def _operator_times(profiler) -> Dict[str, float]:
    """GPU time (microseconds) of the kernels each operator launched itself, by operator and input shapes."""
    times: Dict[str, float] = defaultdict(float)
    for event in profiler.key_averages(group_by_input_shape=True):
        if event.device_type == torch.autograd.DeviceType.CPU and event.self_device_time_total > 0:
            times[f"{event.key} {event.input_shapes}"] += event.self_device_time_total
    return times


def _write_atomically(path: str, write) -> None:
    tmp = f"{path}.tmp"
    write(tmp)
    os.replace(tmp, path)


class StepProfiler:
    """Profiles the updates ``first`` to ``last`` of one process and writes its files into ``folder``."""

    def __init__(self, updates: Tuple[int, int], folder: str, rank: int, cuda: bool):
        self.first, self.last = updates
        self.folder = folder
        self.rank = rank
        self.cuda = cuda
        self._profiler = None

    def before_update(self, update: int) -> None:
        """Called before update ``update`` (counted from 1) runs."""
        if update == self.first and self._profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities, record_shapes=self.cuda)
            self._profiler.__enter__()

    def after_update(self, update: int) -> None:
        """Called once update ``update`` returned; the last one stops the profiler and writes the files."""
        if update == self.last and self._profiler is not None:
            if self.cuda:
                torch.cuda.synchronize()
            profiler, self._profiler = self._profiler, None
            profiler.__exit__(None, None, None)
            self._write(profiler)

    def _write(self, profiler) -> None:
        os.makedirs(self.folder, exist_ok=True)
        base = os.path.join(self.folder, f"kernels_rank{self.rank}")
        trace = os.path.join(self.folder, f"trace_rank{self.rank}.json.gz")
        idle = None

        def write_trace(tmp):
            nonlocal idle
            raw = tmp + ".json"
            profiler.export_chrome_trace(raw)
            if self.cuda:
                with open(raw) as handle:
                    idle = trace_idle(json.load(handle))
            with open(raw, "rb") as source, gzip.open(tmp, "wb") as target:
                shutil.copyfileobj(source, target)
            os.remove(raw)

        _write_atomically(trace, write_trace)
        summary = summarize(
            _own_times(profiler, self.cuda),
            self.last - self.first + 1,
            "cuda" if self.cuda else "cpu",
            _operator_times(profiler) if self.cuda else None,
            idle,
        )

        def write_text(text):
            def write(tmp):
                with open(tmp, "w") as handle:
                    handle.write(text)

            return write

        _write_atomically(base + ".json", write_text(json.dumps(summary, indent=1)))
        _write_atomically(base + ".md", write_text(summary_markdown(summary)))
        logger.info(f"profile of updates {self.first}-{self.last}: {base}.md, {trace}")
