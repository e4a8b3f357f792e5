"""Compile a parallel plan for a model and print why it was chosen.

    python scripts/plan_report.py --model MODEL_DIR_OR_CONFIG_JSON --plan-ngpus 8 --mem-per-gpu 20 [--output plan.json]

Builds the model from its config on fake tensors (no weights), costs every plan of a scale unit of
``--plan-ngpus`` GPUs, and prints the chosen plan and the best alternatives as a table (tp, pp, schedule,
micro-batches, recompute, ZeRO level, predicted memory, predicted step time, why rejected), and for each ZeRO
level not chosen its best plan and why. ``--output`` writes
the plan JSON (atomically) for ``PLAN_FILE``. When no plan fits it prints one line naming the MEM_PER_GPU
(or PLAN_NGPUS) that would, and exits 2. ``run.sh compile`` runs this with the run's settings.
"""

import argparse
import dataclasses
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the fairseq_ext beside this script

from fairseq_ext.cube.compile import CompileSettings, compile_plan, format_report
from fairseq_ext.cube.hardware import GIB, GPU_KINDS, Hardware, gpu_kind_of, hardware_for
from fairseq_ext.cube.plan import MAX_ZERO, PIPELINE_SCHEDULES
from fairseq_ext.cube.profile import PRECISIONS
from fairseq_ext.cube.runtime.recompute import parse_module_names
from fairseq_ext.cube.search import Fixed
from fairseq_ext.errors import PREFIX, UserInputError
from fairseq_ext.optim.low_bit import OPTIMIZER_STATES, PRECISION_STATES


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder with config.json, or the config.json file")
    parser.add_argument("--plan-ngpus", type=int, required=True, help="GPUs of one scale unit (PLAN_NGPUS)")
    parser.add_argument(
        "--mem-per-gpu",
        type=float,
        default=None,
        help="budget in GB (2**30 bytes) per GPU (MEM_PER_GPU); default 0.8 x this host's GPU memory",
    )
    parser.add_argument("--scaling-factor", type=int, default=1, help="scale units (CUBE_SCALING_FACTOR)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per scale unit per micro-step (BATCH_SIZE)")
    parser.add_argument("--sequence-length", type=int, default=512, help="tokens per sample (SEQUENCE_LENGTH)")
    parser.add_argument(
        "--max-tokens", type=int, help="tokens per micro-step of a scale unit instead of --batch-size (MAX_TOKENS)"
    )
    parser.add_argument("--gradient-accu-num", type=int, default=1, help="micro-steps per update (GRADIENT_ACCU_NUM)")
    parser.add_argument(
        "--use-zero",
        type=_level_or_auto,
        default=None,
        help="ZeRO level 0..3 across the scale units (USE_ZERO), or auto (default): the search chooses",
    )
    parser.add_argument(
        "--zero-n-groups",
        type=_count_or_auto,
        default=None,
        help="hybrid groups: shard inside each of this many groups of scale units (ZERO_N_GROUPS), or auto "
        "(default): the search chooses",
    )
    parser.add_argument(
        "--recompute-module-names",
        default="",
        help="fix recompute to these classes (RECOMPUTE_MODULE_NAMES); empty: the search chooses",
    )
    parser.add_argument(
        "--offload-activations",
        choices=("auto", "0", "1"),
        default="auto",
        help="OFFLOAD_ACTIVATIONS: 1 offloads the decoder layers' activations to host memory in every plan without "
        "recompute, 0 never; auto (default): the search costs it where a plan does not fit MEM_PER_GPU",
    )
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="PRECISION")
    parser.add_argument(
        "--optimizer-states",
        choices=OPTIMIZER_STATES,
        default=PRECISION_STATES,
        help="OPTIMIZER_STATES: Adam's moments as PRECISION keeps them (precision), or quantized (8bit, 4bit)",
    )
    parser.add_argument(
        "--compile-layers",
        type=int,
        choices=(0, 1),
        default=0,
        help="decoder layers under torch.compile (COMPILE): they keep fewer activations",
    )
    parser.add_argument(
        "--lora-config",
        default=None,
        help="LORA_CONFIG of a USE_LORA=1 run: plan for training its adapters only (frozen base)",
    )
    parser.add_argument("--attn-implementation", choices=("sdpa", "eager", "flash_attention_2"), default="sdpa")
    parser.add_argument("--tp", type=int, help="fix the tensor-parallel degree")
    parser.add_argument("--pp", type=int, help="fix the pipeline-parallel degree")
    parser.add_argument("--pp-schedule", choices=PIPELINE_SCHEDULES, help="fix the pipeline schedule")
    parser.add_argument("--num-microbatches", type=int, help="fix the micro-batch count")
    parser.add_argument("--stage-boundaries", help="fix the first layer of stages 1..S-1, comma separated")
    parser.add_argument(
        "--gpu-kind",
        choices=("auto", *GPU_KINDS),
        default="auto",
        help="the training GPUs' kind, whose cost parameters the search uses; auto: this host's GPU, else H100",
    )
    parser.add_argument(
        "--cost-params", help="JSON file overriding the GPU kind's cost-model parameters (see cube/cost.py Hardware)"
    )
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (default 8, or the cost-params file's)")
    parser.add_argument(
        "--pack-sequences",
        type=int,
        choices=(0, 1),
        default=0,
        help="samples packed into rows (PACK_SEQUENCES): plans the runtime cannot pack under are refused",
    )
    parser.add_argument(
        "--sequence-parallel",
        type=int,
        choices=(0, 1),
        default=0,
        help="norms and hidden states between tensor-parallel regions sharded on the sequence (SEQUENCE_PARALLEL)",
    )
    parser.add_argument(
        "--clip-norm",
        type=float,
        default=1.0,
        help="gradient clipping of the run (CLIP_NORM, run.sh's default 1.0); the step inside the backward needs 0",
    )
    parser.add_argument(
        "--optimizer-in-backward",
        choices=("auto", "0", "1"),
        default="auto",
        help="the optimizer step inside the backward (OPTIMIZER_IN_BACKWARD): 1 every plan, 0 none, auto (default): "
        "the search takes it where a plan does not fit without it and the settings allow it",
    )
    parser.add_argument("--output", help="write the chosen plan here (e.g. $OUTPUT_DIR/plan.json)")
    parser.add_argument("--top", type=int, default=8, help="alternatives to show of each kind")
    return parser.parse_args(argv)


def default_mem_per_gpu() -> float:
    """0.8 x the memory of this host's first GPU, in GiB; a host without a GPU must be told."""
    import torch

    if not torch.cuda.is_available():
        raise UserInputError(
            "MEM_PER_GPU is not set and this host has no GPU to read it from; set MEM_PER_GPU to "
            "the GB per GPU the plan may use on the training GPUs (e.g. 64 for 80 GB H100s)"
        )
    return 0.8 * torch.cuda.get_device_properties(0).total_memory / GIB


def _level_or_auto(text: str) -> Optional[int]:
    if text == "auto":
        return None
    if text not in {str(level) for level in range(MAX_ZERO + 1)}:
        raise argparse.ArgumentTypeError(f"USE_ZERO must be a ZeRO level 0..{MAX_ZERO} or auto, got {text!r}")
    return int(text)


def _count_or_auto(text: str) -> Optional[int]:
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"ZERO_N_GROUPS must be a positive integer or auto, got {text!r}")
    return int(text)


def host_gpu_kind() -> str:
    """The GPU_KINDS key of this host's first GPU; H100 on a host without one."""
    import torch

    return gpu_kind_of(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "H100"


def settings_from(args) -> CompileSettings:
    hardware = hardware_for(host_gpu_kind() if args.gpu_kind == "auto" else args.gpu_kind)
    if args.cost_params:
        hardware = Hardware.from_json(args.cost_params, base=hardware)
    if args.gpus_per_node:
        hardware = dataclasses.replace(hardware, gpus_per_node=args.gpus_per_node)
    bounds = None
    if args.stage_boundaries:
        try:
            bounds = tuple(int(x) for x in args.stage_boundaries.replace(",", " ").split())
        except ValueError:
            raise UserInputError(f"--stage-boundaries must be layer indices, got {args.stage_boundaries!r}") from None
    recompute = tuple(parse_module_names(args.recompute_module_names)) or None
    offload = {"auto": None, "0": False, "1": True}[args.offload_activations]
    fixed = Fixed(
        tp=args.tp,
        pp=args.pp,
        pp_schedule=args.pp_schedule,
        num_microbatches=args.num_microbatches,
        stage_boundaries=bounds,
        recompute_modules=recompute,
        optimizer_in_backward=None if args.optimizer_in_backward == "auto" else args.optimizer_in_backward == "1",
        offload=offload,
    )
    return CompileSettings(
        model=args.model,
        plan_ngpus=args.plan_ngpus,
        mem_per_gpu=args.mem_per_gpu if args.mem_per_gpu is not None else default_mem_per_gpu(),
        scaling_factor=args.scaling_factor,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        seq_len=args.sequence_length,
        grad_accu=args.gradient_accu_num,
        zero=args.use_zero,
        zero_n_groups=args.zero_n_groups,
        precision=args.precision,
        optimizer_states=args.optimizer_states,
        attn_implementation="sdpa" if args.attn_implementation != "eager" else "eager",
        compiled=bool(args.compile_layers),
        lora_config=args.lora_config,
        packing=bool(args.pack_sequences),
        sequence_parallel=bool(args.sequence_parallel),
        clip_norm=args.clip_norm,
        fixed=fixed,
        hardware=hardware,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        compiled = compile_plan(settings_from(args))
        if compiled.plan is None:
            raise UserInputError(compiled.error)
        print(format_report(compiled, top=args.top))
        if args.output:
            compiled.plan.save(args.output)
            print(
                f"plan written to {os.path.abspath(args.output)} (train with PLAN_FILE={os.path.abspath(args.output)})"
            )
    except UserInputError as err:
        print(f"{PREFIX} {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
