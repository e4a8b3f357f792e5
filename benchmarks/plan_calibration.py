"""The compile pass's predictions against GPU measurements: peak memory and step time of measured runs.

Reads the JSON files ``single_gpu_speed.py`` wrote on the GPU, takes every full-finetune and LoRA row of
ours (one GPU: PLAN_NGPUS=1, the row's PRECISION, COMPILE, micro-batch, LoRA, recompute, USE_ZERO and
OPTIMIZER_IN_BACKWARD, or the plan the compile pass chose for it), predicts it with the cost model on this machine (meta-device profile, no GPU) and
prints the table of ``cube.calibration_table.predicted_vs_measured``: predicted allocated memory (the cost model's peak
before its allocator slack and workspace, which model what ``max_memory_reserved`` adds) against
``torch.cuda.max_memory_allocated``, predicted step time against the measured median.

Rows of variable-length data (``data`` varlen or chat, padded or packed) are costed with the micro-batches the
run made: the benchmark's sample lengths (``speed_inputs.write_dataset``: the same generator and seed), cut
and ordered as the run cut them (packing, the length-sorted order, fairseq's seeded shuffle of whole
batches), padded rows at the length the runtime pads them to (``cube.batch_padding.LengthRule``); the step time is the median of each timed update's prediction, the memory that of the run's
largest micro-batch (``cube.batch_layout``).

    python benchmarks/plan_calibration.py --gpu-kind H200 benchmarks/results/single_gpu_speed/run10.json \
        [more.json ...] [--cost-params more.json] [--exclude "run9 ROW,..."] [--out calibration.md]

The cost parameters are the measured GPU kind's (``cube.hardware.GPU_KINDS``), as the compile pass takes them.
"""

import argparse
import dataclasses
import functools
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_baseline import baseline_lengths  # noqa: E402
from speed_rows import SAMPLES_PER_PACKED_ROW  # noqa: E402

from fairseq_ext.cube.batch_layout import document_rows, first_lengths, from_micro_batches  # noqa: E402
from fairseq_ext.cube.batch_padding import LengthRule  # noqa: E402
from fairseq_ext.cube.calibration_table import predicted_vs_measured  # noqa: E402
from fairseq_ext.cube.cost import GIB, Workload, estimate  # noqa: E402
from fairseq_ext.cube.hardware import GPU_KINDS, Hardware, hardware_for  # noqa: E402
from fairseq_ext.cube.plan import Plan  # noqa: E402
from fairseq_ext.cube.profile import Lora, profile_model  # noqa: E402


def measured_rows(paths):
    """(row, settings) for each full-finetune or LoRA row of ours that ran, from benchmark JSON files."""
    for path in paths:
        data = json.loads(Path(path).read_text())
        # the row settings' USE_ZERO and OPTIMIZER_IN_BACKWARD
        settings_of = {r["name"]: r for r in data["settings"].get("rows", [])}
        for row in data["rows"]:
            if row.get("source") == "ours" and row.get("mode") in ("full", "lora") and row.get("status") == "ok":
                given = settings_of.get(row["name"], {})
                yield (
                    dict(
                        row,
                        run=Path(path).stem,
                        zero=row.get("zero", given.get("zero", 0)),
                        in_backward=bool(row.get("in_backward", given.get("in_backward", 0))),
                    ),
                    data["settings"],
                )


def lora_of(row: dict, settings: dict):
    """The LoRA adapters of a ``lora`` row (from the run's LORA_CONFIG), else None."""
    if row.get("mode") != "lora":
        return None
    return Lora.from_config(settings["lora_config"], "llama")


def predict(row: dict, settings: dict, hardware: Hardware) -> dict:
    """Predicted allocated GiB and step seconds of one measured row."""
    from transformers import LlamaConfig

    shape = settings["shapes"][row["model"]]
    config = LlamaConfig(
        **dict(shape, max_position_embeddings=max(shape["max_position_embeddings"], settings["seq"])),
        tie_word_embeddings=False,
        use_cache=False,
    )
    if row.get("plan"):
        plan = Plan(**{k: v for k, v in row["plan"].items() if k != "version"})
    else:
        recompute = tuple(filter(None, (row.get("recompute") or "").split(",")))
        # USE_ZERO >= 1 on one GPU: FSDP2 over one rank (Plan.on_fsdp)
        plan = Plan(
            plan_ngpus=1,
            scaling_factor=1,
            tp=1,
            pp=1,
            zero=row.get("zero", 0),
            recompute_modules=recompute,
            optimizer_in_backward=bool(row.get("in_backward")),
        )
    profile = _profile(
        config.to_json_string(), settings["seq"], row["precision"], bool(row.get("compile")), lora_of(row, settings)
    )
    # OPTIMIZER_STATES of the row (single_gpu_speed's ``states``): the moments' bytes and the step's
    work = Workload(
        row["mb"], settings["seq"], grad_accu=row.get("accu", 1), optimizer_states=row.get("states") or "precision"
    )
    cost = estimate(profile, plan, work, hardware)
    step_time = cost.step_time
    updates = run_micro_batches(row, settings)
    if updates is not None:
        packed = bool(row.get("pack"))
        # padded rows at the length the runtime pads them to
        rule = LengthRule.of(plan, settings["seq"], bool(row.get("compile")), sequence_parallel=False)
        layout = from_micro_batches(updates, packed, rule)  # every update of the run: its largest decides the peak
        cost = estimate(profile, plan, dataclasses.replace(work, layout=layout), hardware)
        timed = slice(row["warmup"], row["warmup"] + row["steps"])
        firsts = first_lengths(updates, packed, rule)  # updates whose padded length is new to the run
        step_time = statistics.median(
            estimate(
                profile,
                plan,
                dataclasses.replace(work, layout=from_micro_batches([b], packed, rule), new_lengths=first),
                hardware,
            ).step_time
            for b, first in zip(updates[timed], firsts[timed])
        )
    allocated = cost.parts["allocated"]
    group = (
        f"{row['run']} {row['model']} {row['mode']} {row['precision']} COMPILE={int(bool(row.get('compile')))} "
        f"mb {row['mb']}"
    )
    return dict(
        name=f"{row['run']} {row['name']}",
        predicted_gib=allocated / GIB,
        measured_gib=row["peak_alloc_gib"],
        predicted_s=step_time,
        measured_s=row["step_median_s"],
        group=group,
    )


def run_micro_batches(row: dict, settings: dict):
    """The micro-batches (rows of document lengths) of a variable-length row's updates, in the order the run
    trained them; None for rows of fixed-length data. Raises ValueError when they disagree with the
    tokens per update the run logged (the reconstruction no longer matches the benchmark)."""
    kind = row.get("data", "fixed")
    if kind == "fixed":
        return None
    import numpy as np
    from fairseq.data import data_utils

    seq = settings["seq"]
    lengths = baseline_lengths().sample_lengths(kind, _dataset_rows(row, settings), seq, np.random.default_rng(0))
    # the run's order: ties in length broken by a permutation under the seed, whole batches shuffled under it
    run_seed = 1 + 1  # run.sh SEED=1, epoch 1
    rows = document_rows(lengths, seq, packing=bool(row.get("pack")))
    sizes = np.array([sum(r) for r in rows])
    with data_utils.numpy_seed(run_seed):
        order = np.random.permutation(len(rows))
    order = order[np.argsort(sizes[order], kind="mergesort")]
    batches = [[rows[i] for i in order[start : start + row["mb"]]] for start in range(0, len(order), row["mb"])]
    with data_utils.numpy_seed(run_seed):
        np.random.shuffle(batches)
    updates = batches[: row["warmup"] + row["steps"]]
    timed = updates[row["warmup"] :]
    logged = statistics.median(sum(map(sum, b)) if row.get("pack") else max(map(sum, b)) * len(b) for b in timed)
    if logged != row["tokens_per_update"]:
        raise ValueError(
            f"{row['run']} {row['name']}: the rebuilt batches hold {logged} tokens per update, the run logged "
            f"{row['tokens_per_update']}"
        )
    return updates


def _dataset_rows(row: dict, settings: dict) -> int:
    """Samples the benchmark wrote for the row's data (``single_gpu_speed.Benchmark``: enough for the longest
    row of the run that uses the same vocabulary and data kind)."""
    vocab = settings["shapes"][row["model"]]["vocab_size"]
    need = 0
    for other in settings["rows"]:
        if settings["shapes"][other["model"]]["vocab_size"] != vocab or other.get("data", "fixed") != row["data"]:
            continue
        warmup = settings["compile_warmup"] if other["compile"] else settings["warmup"]
        per_row = SAMPLES_PER_PACKED_ROW[row["data"]] if other["pack"] else 1
        need = max(need, ((warmup + settings["steps"]) * other["mb"] + other["mb"]) * per_row)
    return need


@functools.lru_cache(maxsize=16)
def _profile(config_json: str, seq: int, precision: str, compiled: bool, lora):
    """One profile per model and settings (rows of several runs share it; profiling costs seconds)."""
    from transformers import AutoConfig

    data = json.loads(config_json)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    return profile_model(config, seq, precision, compiled=compiled, lora=lora)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="single_gpu_speed.json files")
    parser.add_argument(
        "--exclude",
        default="",
        help="comma-separated 'run row' names to leave out (e.g. measured "
        "with code the cost model no longer describes)",
    )
    parser.add_argument(
        "--gpu-kind", choices=sorted(GPU_KINDS), default="H100", help="the GPU the runs were measured on"
    )
    parser.add_argument(
        "--cost-params",
        help="a JSON file of cost.Hardware values overriding the GPU kind's (plan_report.py --cost-params)",
    )
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    hardware = hardware_for(args.gpu_kind)
    if args.cost_params:
        hardware = Hardware.from_json(args.cost_params, base=hardware)
    excluded = set(filter(None, args.exclude.split(",")))
    rows = [
        predict(row, settings, hardware)
        for row, settings in measured_rows(args.results)
        if f"{row['run']} {row['name']}" not in excluded
    ]
    table = predicted_vs_measured(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
