"""Command-line settings of the cube runtime, mixed into the ``hf_finetune`` task's config.

They live on the task because fairseq hands every component the task config; the cube trainer reads
them from ``cfg.task`` and turns them into a Plan with :func:`plan_from_config`.
"""

import dataclasses
import logging
from dataclasses import dataclass, field

from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from ..errors import UserInputError
from .collective_timeout import DEFAULT_SECONDS
from .plan import Plan, default_plan

logger = logging.getLogger(__name__)

CHECKPOINT_FORMATS = ("auto", "full", "dcp")


@dataclass
class CubeConfig(FairseqDataclass):
    use_zero: int = field(
        default=0,
        metadata={
            "help": "ZeRO level of the data parallel between scale units (USE_ZERO): 0 every unit keeps weights, "
            "gradients and optimizer states; 1 and 2 shard gradients and optimizer states (2 also between "
            "accumulated batches), weights gathered once per update; 3 also reshards weights after the forward"
        },
    )
    zero_n_groups: int = field(
        default=1,
        metadata={
            "help": "ZeRO shards inside this many groups of consecutive units and replicates across them (hybrid "
            "sharding; ZERO_N_GROUPS; run.sh: NNODES)"
        },
    )
    plan_ngpus: int = field(
        default=1,
        metadata={
            "help": "GPUs (processes) in one scale unit, which runs tensor x pipeline parallel inside (PLAN_NGPUS)"
        },
    )
    cube_scaling_factor: int = field(
        default=0,
        metadata={"help": "scale units, data parallel to each other (CUBE_SCALING_FACTOR); 0: world size / plan-ngpus"},
    )
    sequence_parallel: bool = field(
        default=False,
        metadata={
            "help": "tensor-parallel plans of Llama-style decoders: the norms and the hidden states between the "
            "tensor-parallel regions hold 1/tp of the tokens on each rank (SEQUENCE_PARALLEL)"
        },
    )
    optimizer_in_backward: bool = field(
        default=False,
        metadata={
            "help": "step each weight inside the backward as soon as its gradient is final and free the gradient "
            "(one process, --optimizer torch_adamw, no clipping or accumulation; OPTIMIZER_IN_BACKWARD); "
            "a plan file's optimizer_in_backward turns it on too"
        },
    )
    offload_activations: bool = field(
        default=False,
        metadata={
            "help": "keep what each decoder layer saves for its backward in pinned host memory until the backward "
            "needs it (OFFLOAD_ACTIVATIONS; GPUs only): less GPU memory for long sequences, the copies' time added"
        },
    )
    plan_file: str = field(
        default="",
        metadata={
            "help": "a Plan JSON file (PLAN_FILE); it replaces --plan-ngpus, --cube-scaling-factor, --use-zero "
            "and --zero-n-groups"
        },
    )
    speed_log: str = field(
        default="",
        metadata={
            "help": "append one JSON line per update (wall and compute seconds, tokens, peak memory) to this file "
            "(SPEED_LOG; written by the first rank)"
        },
    )
    profile_updates: str = field(
        default="",
        metadata={
            "help": "FIRST:LAST: torch.profiler over these updates (counted from 1); each rank writes a Chrome trace "
            "and its device time by kind of kernel into --profile-dir (PROFILE_UPDATES)"
        },
    )
    profile_dir: str = field(
        default="",
        metadata={"help": "folder of --profile-updates' files; default: 'profile' beside --save-dir (PROFILE_DIR)"},
    )
    collective_timeout: float = field(
        default=DEFAULT_SECONDS,
        metadata={
            "help": "seconds a rank waits in a collective operation for the others before the run stops naming the "
            "rank that stopped answering (COLLECTIVE_TIMEOUT); every process group of the run gets it"
        },
    )
    checkpoint_format: ChoiceEnum(list(CHECKPOINT_FORMATS)) = field(
        default="auto",
        metadata={
            "help": "full: fairseq's one file with every tensor, gathered on the first rank; dcp: fairseq's files "
            "stay small and each rank writes its own shards (torch.distributed.checkpoint) into a folder "
            "beside them; auto: dcp for plans of several processes on a mesh (tensor, pipeline or FSDP2 data "
            "parallel), else full (CHECKPOINT_FORMAT)"
        },
    )


def plan_from_config(task_cfg, world_size: int, gpus_per_node: int) -> Plan:
    """The Plan of this run: ``--plan-file`` when given, else the default rule for ``--plan-ngpus``.

    Raises:
        UserInputError: a plan that does not run on ``world_size`` processes, or bad counts.
    """
    plan_file = getattr(task_cfg, "plan_file", "") or ""
    if plan_file:
        plan = Plan.load(plan_file)
    else:
        plan_ngpus = getattr(task_cfg, "plan_ngpus", 1)
        scaling_factor = getattr(task_cfg, "cube_scaling_factor", 0)
        if plan_ngpus < 1:
            raise UserInputError(f"PLAN_NGPUS must be a positive integer, got {plan_ngpus}")
        if scaling_factor == 0:
            if world_size % plan_ngpus:
                raise UserInputError(
                    f"PLAN_NGPUS {plan_ngpus} does not divide the world size {world_size} (NPROC_PER_NODE x NNODES)"
                )
            scaling_factor = world_size // plan_ngpus
        zero = int(getattr(task_cfg, "use_zero", 0))
        plan = default_plan(
            plan_ngpus,
            scaling_factor,
            gpus_per_node=gpus_per_node,
            zero=zero,
            zero_n_groups=getattr(task_cfg, "zero_n_groups", 1) if zero else 1,
        )
    if getattr(task_cfg, "optimizer_in_backward", False):
        plan = dataclasses.replace(plan, optimizer_in_backward=True)
    plan.check_world_size(world_size)
    return plan


def checkpoint_format(task_cfg, on_mesh: bool) -> str:
    """``full`` or ``dcp``: the run's ``--checkpoint-format``, with ``auto`` resolved (dcp for a plan that runs
    on a DeviceMesh, where no rank holds the whole model)."""
    choice = str(getattr(task_cfg, "checkpoint_format", "auto") or "auto")
    if choice not in CHECKPOINT_FORMATS:
        raise UserInputError(f"unknown --checkpoint-format {choice!r}; choose one of {', '.join(CHECKPOINT_FORMATS)}")
    if choice == "auto":
        return "dcp" if on_mesh else "full"
    return choice
