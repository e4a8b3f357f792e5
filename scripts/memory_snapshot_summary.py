"""The tensors alive at the peak of a CUDA memory snapshot (``MEMORY_SNAPSHOT_UPDATE``), grouped by where they
were allocated, in GiB.

    python scripts/memory_snapshot_summary.py LOG_DIR/memory_snapshot_rank0.pickle [--out summary.md]

The peak is found by walking the allocator's recorded events back from the snapshot's end: each ``alloc``
undone removes its block, each ``free_requested`` undone puts its block back (allocated bytes, as
``torch.cuda.max_memory_allocated`` counts them: block sizes, rounded up by the allocator). Each live block is
grouped by the innermost frame of this project (``fairseq_ext/``) and the innermost Python frame of its
allocation; blocks allocated before the recording started, or from C++ alone (the autograd engine's backward),
carry no Python frame and say so.
"""

import argparse
import pickle
import sys
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

GIB = 1024**3
NO_FRAME = "(no Python frame: before the recording, or allocated from C++: autograd's backward)"
TOP_GROUPS = 30

# (category, substring of an allocation frame's file name); the first match over the frames, innermost first.
CATEGORIES = (
    ("FSDP2 (torch.distributed.fsdp)", "torch/distributed/fsdp"),
    ("compiled code (inductor)", "torchinductor"),
    ("optimizer", "/optim/"),
    ("communication (c10d)", "torch/distributed/"),
    ("autograd", "torch/autograd"),
)

Block = Tuple[int, list]  # (bytes, allocation frames, innermost first)


def _frame(frame: dict) -> str:
    path = frame.get("filename", "?")
    for marker in ("fairseq_ext/", "site-packages/", "dist-packages/"):
        if marker in path:
            path = (marker if marker == "fairseq_ext/" else "") + path.split(marker, 1)[1]
            break
    return f"{path}:{frame.get('line', '?')} {frame.get('name', '?')}"


def _python_frames(frames: list) -> list:
    return [f for f in frames or [] if str(f.get("filename", "")).endswith(".py") or "torchinductor" in str(f)]


def group_of(frames: list) -> Tuple[str, str, str]:
    """(category, innermost fairseq_ext frame, innermost Python frame) of an allocation's stack."""
    python = _python_frames(frames)
    if not python:
        return "no Python frame", NO_FRAME, ""
    project = next((_frame(f) for f in python if "fairseq_ext/" in f.get("filename", "")), "(none)")
    category = next(
        (name for f in python for name, part in CATEGORIES if part in f.get("filename", "")),
        "other",
    )
    return category, project, _frame(python[0])


def _device_trace(snapshot: dict) -> Tuple[int, list]:
    traces = snapshot.get("device_traces") or [[]]
    device = max(range(len(traces)), key=lambda i: len(traces[i]))
    return device, traces[device]


def live_at_peak(snapshot: dict) -> Tuple[Dict[int, Block], int, Optional[int]]:
    """The blocks alive at the recorded peak of allocated bytes, that peak, and the index of the trace event
    just after it (None: the snapshot's end)."""
    device, trace = _device_trace(snapshot)
    live: Dict[int, Block] = {}
    for segment in snapshot.get("segments", []):
        if segment.get("device", device) != device:
            continue
        for block in segment.get("blocks", []):
            if block.get("state") == "active_allocated":
                live[block["address"]] = (block["size"], block.get("frames", []))

    # a free's own frames are where it was freed: put back the frames of the allocation it frees
    allocated_by: Dict[int, list] = {}
    freed_frames: Dict[int, list] = {}
    for index, event in enumerate(trace):
        if event["action"] == "alloc":
            allocated_by[event["addr"]] = event.get("frames", [])
        elif event["action"] == "free_requested":
            freed_frames[index] = allocated_by.pop(event["addr"], None) or []

    def walk(stop: Optional[int]):
        state, total = dict(live), sum(size for size, _ in live.values())
        best, best_at = total, None
        for index in range(len(trace) - 1, -1, -1):
            if stop is not None and index < stop:
                break
            event = trace[index]
            if event["action"] == "alloc":
                removed = state.pop(event["addr"], None)
                total -= removed[0] if removed else 0
            elif event["action"] == "free_requested":
                state[event["addr"]] = (event["size"], freed_frames[index])
                total += event["size"]
            if total > best:
                best, best_at = total, index
        return state, best, best_at

    _, peak, at = walk(None)
    state, _, _ = walk(at) if at is not None else (live, peak, None)
    return state, peak, at


def summarize(snapshot: dict) -> dict:
    """The live blocks at the peak grouped by category and by (project frame, innermost frame), in bytes."""
    state, peak, at = live_at_peak(snapshot)
    categories: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
    groups: Dict[Tuple[str, str, str], List[int]] = defaultdict(lambda: [0, 0])
    for size, frames in state.values():
        key = group_of(frames)
        for table, name in ((categories, key[0]), (groups, key)):
            table[name][0] += size
            table[name][1] += 1
    own = snapshot.get("fairseq_ext", {})
    return {
        "update": own.get("update"),
        "max_memory_allocated": own.get("max_memory_allocated"),
        "peak_bytes": peak,
        "peak_event": at,
        "events": len(_device_trace(snapshot)[1]),
        "categories": sorted(
            ({"category": k, "bytes": v[0], "blocks": v[1]} for k, v in categories.items()), key=lambda r: -r["bytes"]
        ),
        "groups": sorted(
            (
                {"category": k[0], "project_frame": k[1], "innermost_frame": k[2], "bytes": v[0], "blocks": v[1]}
                for k, v in groups.items()
            ),
            key=lambda r: -r["bytes"],
        ),
    }


def summary_markdown(summary: dict) -> str:
    """The summary as Markdown tables, GiB."""
    peak = summary["peak_bytes"] / GIB
    measured = summary["max_memory_allocated"]
    lines = [
        f"# Live tensors at the peak: {peak:.2f} GiB allocated"
        + (f" (torch.cuda.max_memory_allocated {measured / GIB:.2f} GiB)" if measured else "")
        + (f", snapshot at the end of update {summary['update']}" if summary.get("update") else ""),
        "",
        f"Peak at allocator event {summary['peak_event']} of {summary['events']} recorded (None: the snapshot's end).",
        "",
        "| category | GiB | blocks |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {c['category']} | {c['bytes'] / GIB:.3f} | {c['blocks']} |" for c in summary["categories"]]
    lines += [
        "",
        "| GiB | blocks | category | fairseq_ext frame | innermost frame |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {g['bytes'] / GIB:.3f} | {g['blocks']} | {g['category']} | `{g['project_frame']}` | "
        f"`{g['innermost_frame']}` |"
        for g in summary["groups"][:TOP_GROUPS]
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("snapshot", help="a memory_snapshot_rank<R>.pickle")
    parser.add_argument("--out", help="write the Markdown here (default: print it)")
    args = parser.parse_args(argv)
    try:
        with open(args.snapshot, "rb") as handle:
            snapshot = pickle.load(handle)  # a file this project's trainer wrote (torch.cuda.memory._snapshot)
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        print(f"memory_snapshot_summary: error: cannot read {args.snapshot}: {err}", file=sys.stderr)
        return 2
    text = summary_markdown(summarize(snapshot))
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
