"""GPU time by kind of kernel, and GPU idle time, in a Chrome trace written by ``PROFILE_UPDATES`` (or any
torch.profiler trace).

    python scripts/profile_summary.py OUTPUT_DIR/profile/trace_rank0.json.gz --updates 3
"""

import argparse
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairseq_ext.cube.step_profile import summarize, summary_markdown, trace_idle, trace_kernel_times  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path, help="a .json or .json.gz Chrome trace")
    parser.add_argument("--updates", type=int, default=1, help="updates the trace covers (for ms per update)")
    args = parser.parse_args(argv)
    opener = gzip.open if args.trace.suffix == ".gz" else open
    try:
        with opener(args.trace, "rt") as handle:
            trace = json.load(handle)
    except (OSError, ValueError) as error:
        print(f"profile_summary: error: cannot read the trace {args.trace}: {error}", file=sys.stderr)
        return 2
    summary = summarize(trace_kernel_times(trace), args.updates, "cuda", idle=trace_idle(trace))
    print(summary_markdown(summary), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
