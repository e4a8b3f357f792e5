"""benchmarks/fsdp_memory_probe.py on a tiny Llama shape: at ZeRO 1 over one rank, the runtime's FSDP2 sharding
holds one gathered bf16 copy of every weight beside the shards at the peak, as cost.py's FSDP2 term says."""

import json
import subprocess
import sys

from tests.helpers import REPO

TINY = ["--layers", "2", "--hidden", "256", "--intermediate", "512", "--heads", "4", "--kv-heads", "2"]
TINY += ["--vocab", "1000", "--mb", "8", "--seq", "1024"]  # activations make the peak: the backward's start


def test_zero1_on_one_rank_holds_one_gathered_copy_of_the_weights():
    script = REPO / "benchmarks" / "fsdp_memory_probe.py"
    out = subprocess.run([sys.executable, str(script), *TINY], check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    weights = result["params"] * 2
    assert result["plain"]["Parameter"] == weights
    assert result["fsdp2"]["Sharded Param"] == weights
    assert result["fsdp2"]["Unsharded Param"] == weights
    assert result["extra_bytes"] == weights  # and nothing else of FSDP2 then
    assert "FSDP2 (ZeRO 1) holds" in out


def test_real_tensors_on_the_cpu_allocator_agree():
    """The same on real tensors, counted by the CPU allocator (the profiler's memory events): FSDP2's peak is the
    plain one plus one bf16 copy of the weights."""
    script = REPO / "benchmarks" / "fsdp_memory_probe.py"
    shape = ["--layers", "2", "--hidden", "128", "--intermediate", "256", "--heads", "4", "--kv-heads", "2"]
    shape += ["--vocab", "500", "--mb", "2", "--seq", "128"]
    out = subprocess.run([sys.executable, str(script), "--real", *shape], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["extra_bytes"] == result["params"] * 2
