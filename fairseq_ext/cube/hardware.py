"""The cost model's device and link parameters, and their fitted values for each GPU kind, in one place.

``run.sh compile`` (``scripts/plan_report.py``) takes the kind of the host's GPU, H100 on a host without one, or
``--gpu-kind``; ``--cost-params`` overrides single values with a JSON file.
"""

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

from ..errors import UserInputError

GIB = float(2**30)  # MEM_PER_GPU and every memory figure printed are in GiB ("GB" in the docs)


@dataclass(frozen=True)
class Hardware:
    """Device and link parameters. Defaults: H100 SXM 80 GB, NVLink inside a node, InfiniBand between nodes;
    :data:`GPU_KINDS` holds the fitted ones of each GPU kind.

    Override any of them with a JSON file (``--cost-params``) holding some of these keys.
    """

    gpus_per_node: int = 8
    device_flops: float = 989e12  # bf16/fp16 dense tensor-core peak, FLOP/s
    fp32_flops: float = 67e12  # fp32 without TF32 (torch's default for matmuls)
    efficiency: float = 0.42  # fraction of peak the model's kernels reach, eager (fitted: calibration_by_gpu.md)
    compiled_speedup: float = 1.38  # decoder layers under torch.compile (COMPILE=1) against eager (calibration.md)
    # PRECISION=fp8: the FLOPs of the linear layers that multiply in float8 (runtime/float8.py) run this much faster
    # than in bf16, their casts included (peak 1979e12 against 989e12 FLOP/s; fitted on the H100 rows of runs 24 and
    # 28: the largest error of the four fp8 rows at its least, 8.3%)
    fp8_speedup: float = 1.29
    hbm_bandwidth: float = 3.0e12  # bytes/s the memory-bound optimizer step reaches (3.35e12 on the datasheet)
    # the fraction of hbm_bandwidth FSDP2's copies reach on one rank alone (one GPU at a ZeRO level): fitted on
    # H100 runs 30 (1.1B ZeRO 1: 4.2 ms over the plain row for 8.8 GB moved) and 30b (8B ZeRO 3: 29 ms for 96 GB,
    # against a plain row the model itself puts 5.3% high); unmeasured on the H200
    one_rank_copy_efficiency: float = 0.8
    # attention kernels' rates against causal SDPA over full rows, per unit of tile work (batch_layout.py):
    # fwd + bwd of one 1.1B layer, 8 rows of 2048 tokens, bf16, on an H100: causal SDPA 1.73 ms; varlen_attn
    # over packed documents of [256, 2048] 2.09 ms for 0.758 of the work
    varlen_attention_speed: float = 0.627
    # the host's seconds to queue one forward-backward pass and its share of the update (fairseq's loop, the
    # compiled layers' guards and launches): an update takes at least this, however few its tokens (H100 run
    # 27: updates of 1,024-2,560 padded tokens at lengths run before took 0.043-0.049 s)
    host_seconds_per_pass: float = 0.045
    # an update of padded rows (COMPILE=1) whose padded length no earlier update had takes this much longer
    # (H100 runs 27: +0.070 to +0.106 s on each such update, none on the others; not a recompile)
    new_length_seconds: float = 0.09
    # bytes/s of one GPU's copies to and from pinned host memory (activation offloading, runtime/offload.py): PCIe
    # Gen5 x16 (64 GB/s a direction on paper). H100 (benchmarks/results/offload_speed): pinned copies of 1 GiB ran
    # at 55.2 GB/s each way, and offloading 10.03 GiB of a compiled 1.1B model at seq 8192 added 0.386 s to its
    # forward-backward (55.8 GB/s for both ways, the copies not overlapped); the H200 not yet measured
    host_bandwidth: float = 55e9
    intra_node_bandwidth: float = 450e9  # bytes/s per GPU, NVLink, effective for all-reduce
    intra_node_latency: float = 5e-6  # s per ring step
    inter_node_bandwidth: float = 50e9  # bytes/s per GPU, InfiniBand (400 Gb/s NIC per GPU)
    inter_node_latency: float = 10e-6
    allocator_slack: float = 0.05  # fraction the caching allocator loses to fragmentation
    workspace_bytes: float = 0.25 * GIB  # cuBLAS / NCCL workspaces and other small buffers

    @classmethod
    def from_json(cls, path: str, base: Optional["Hardware"] = None) -> "Hardware":
        """``base`` (default: the defaults) overridden by the keys of a JSON object in ``path``; unknown keys
        are an error."""
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise UserInputError(f"cannot read cost parameters {path}: {exc}") from None
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            raise UserInputError(
                f"{path}: unknown cost parameters {sorted(set(data) - known) if isinstance(data, dict) else data!r}; "
                f"known: {', '.join(sorted(known))}"
            )
        for key, value in data.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise UserInputError(f"{path}: {key} must be a non-negative number, got {value!r}")
        return dataclasses.replace(base or cls(), **data)


# The cost parameters of each GPU kind the compile pass can plan for (``--gpu-kind``; default: this host's GPU,
# else H100): the fraction of peak the layers reach and the optimizer step's effective bandwidth, fitted on the
# committed one-GPU rows of the current code (benchmarks/results/single_gpu_speed/calibration_by_gpu.md).
GPU_KINDS = {
    "H100": Hardware(),  # H100 SXM 80 GB: the defaults
    # H200 141 GB (4.8 TB/s on the datasheet): efficiency fitted on runs 17, 18 and 34-34c (the current code)
    "H200": Hardware(efficiency=0.44, hbm_bandwidth=4.0e12),
}


def gpu_kind_of(device_name: str) -> str:
    """The :data:`GPU_KINDS` key of a CUDA device name (``torch.cuda.get_device_name``); H100 for others."""
    for kind in GPU_KINDS:
        if kind.lower() in device_name.lower():
            return kind
    return "H100"


def hardware_for(kind: str) -> Hardware:
    """The cost parameters of a GPU kind, one of :data:`GPU_KINDS`."""
    if kind not in GPU_KINDS:
        raise UserInputError(f"unknown GPU kind {kind!r}; choose one of {', '.join(GPU_KINDS)}")
    return GPU_KINDS[kind]
