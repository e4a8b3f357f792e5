"""Command-line settings of the cube runtime, mixed into the ``hf_finetune`` task's config.

They live on the task because fairseq hands every component the task config; the cube trainer reads
them from ``cfg.task``.
"""

from dataclasses import dataclass, field

from fairseq.dataclass import FairseqDataclass


@dataclass
class CubeConfig(FairseqDataclass):
    use_zero: bool = field(default=False, metadata={
        "help": "ZeRO-1: shard optimizer states among the data-parallel replicas (USE_ZERO)"})
    zero_n_groups: int = field(default=1, metadata={
        "help": "ZeRO-1 shards inside this many groups of consecutive replicas (ZERO_N_GROUPS; run.sh: NNODES)"})
