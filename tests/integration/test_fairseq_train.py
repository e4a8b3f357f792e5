"""fairseq-train end to end on the shipped data, and what fairseq's tools and our scripts do with the result."""

import glob
import json
import sys

import pytest
import torch
from fairseq import checkpoint_utils
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import DATA_DIR, FAIRSEQ_VALIDATE, REPO, fairseq_train, run, tiny_train_args, train_losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run with validation, interval checkpoints, tensorboard and a log file."""
    out = tmp_path_factory.mktemp("train")
    args = tiny_train_args(
        out / "checkpoint",
        max_update=8,
        extra=[
            "--save-interval-updates",
            "4",
            "--validate-interval-updates",
            "4",
            "--keep-interval-updates",
            "2",
            "--tensorboard-logdir",
            str(out / "tensorboard"),
            "--log-file",
            str(out / "train.log"),
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
        ],
    )
    args.remove("--disable-validation")
    result = fairseq_train(args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_loss_falls_and_fairseq_outputs_exist(trained):
    out, result = trained
    losses = train_losses(result.stdout)
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1] - 1.0, losses
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", "checkpoint_1_4.pt", "checkpoint_1_8.pt"):
        assert (out / "checkpoint" / name).is_file(), name
    assert glob.glob(str(out / "tensorboard" / "train_inner" / "events.out.tfevents.*"))
    assert glob.glob(str(out / "tensorboard" / "valid" / "events.out.tfevents.*"))
    log = (out / "train.log").read_text()
    assert '"num_updates": "8"' in log and "done training" in log
    progress_lines = [line for line in log.splitlines() if '"num_updates"' in line]
    assert len(progress_lines) == len(set(progress_lines)), "log file lines are duplicated"
    assert "criterion: hf_causal_lm" in result.stdout


def test_fairseq_logs_its_usual_values_every_update(trained):
    """The trainer's own logging of an update (values left on the device, read at the log interval) gives the
    records fairseq's does."""
    _, result = trained
    records = [
        json.loads(line.split("| train_inner |", 1)[1])
        for line in result.stdout.splitlines()
        if "| train_inner |" in line
    ]
    assert [int(r["num_updates"]) for r in records] == list(range(1, 9))
    for record in records:
        assert {"loss", "nll_loss", "ppl", "wps", "ups", "wpb", "bsz", "lr", "gnorm", "train_wall"} <= set(record)
        assert float(record["gnorm"]) > 0 and float(record["wpb"]) > 0 and float(record["loss"]) > 0
    assert len({r["gnorm"] for r in records}) > 1


def test_fairseq_reads_our_checkpoints(trained):
    out, _ = trained
    state = checkpoint_utils.load_checkpoint_to_cpu(str(out / "checkpoint" / "checkpoint_last.pt"))
    assert state["cfg"].task._name == "hf_finetune" and state["cfg"].model._name == "hf_auto_causal_lm"
    assert state["extra_state"]["train_iterator"]["epoch"] == 1
    assert all(key.startswith("hf_model.") for key in state["model"])


def test_fairseq_validate_evaluates_a_split(trained):
    out, _ = trained
    result = run(
        [
            *FAIRSEQ_VALIDATE,
            DATA_DIR,
            "--user-dir",
            REPO / "fairseq_ext",
            "--task",
            "hf_finetune",
            "--path",
            out / "checkpoint" / "checkpoint_best.pt",
            "--valid-subset",
            "test",
            "--cpu",
            "--batch-size",
            "16",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "valid on 'test' subset" in result.stdout and "| loss " in result.stdout


def test_export_is_bit_identical_and_generates(trained, tmp_path):
    out, _ = trained
    checkpoint = out / "checkpoint" / "checkpoint_last.pt"
    export_dir = tmp_path / "hf"
    result = run([sys.executable, REPO / "scripts" / "export_hf.py", checkpoint, export_dir])
    assert result.returncode == 0, result.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(export_dir)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    state = checkpoint_utils.load_checkpoint_to_cpu(str(checkpoint))["model"]
    exported = model.state_dict()
    assert set(exported) == {k[len("hf_model.") :] for k in state}
    for key, value in state.items():
        assert torch.equal(exported[key[len("hf_model.") :]], value), key
    prompt = tokenizer("What is the last word?\ncat owl\n", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_export_never_clobbers_without_overwrite(trained, tmp_path):
    out, _ = trained
    export_dir = tmp_path / "hf"
    export_dir.mkdir()
    (export_dir / "keep.txt").write_text("mine")
    cmd = [sys.executable, REPO / "scripts" / "export_hf.py", out / "checkpoint" / "checkpoint_last.pt", export_dir]
    result = run(cmd)
    assert result.returncode == 2 and "already exists" in result.stderr and "Traceback" not in result.stderr
    assert (export_dir / "keep.txt").read_text() == "mine"
    assert run(cmd + ["--overwrite"]).returncode == 0
    assert (export_dir / "config.json").is_file() and not (export_dir / "keep.txt").exists()
    assert not list(tmp_path.glob(".hf.*")), "temporary folders left behind"


def test_evaluate_script_reports_exact_match(trained):
    out, _ = trained
    result = run(
        [
            sys.executable,
            REPO / "scripts" / "evaluate.py",
            "--checkpoint",
            out / "checkpoint" / "checkpoint_best.pt",
            "--label",
            "after",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test exact match (after): " in result.stdout and "/200 = " in result.stdout


def test_speed_log_has_one_record_per_update_with_trained_tokens(tmp_path):
    """--speed-log through the trainer: the task's steps are timed (and restored after each update)."""
    import json

    log = tmp_path / "speed.jsonl"
    result = fairseq_train(
        tiny_train_args(tmp_path / "ckpt", max_update=4, extra=["--no-save", "--speed-log", str(log)])
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["update"] for r in records] == [1, 2, 3, 4]
    for record in records:
        assert 0 < record["compute_s"] <= record["step_s"]
        assert 0 < record["trained_tokens"] <= record["tokens"]


def test_profile_updates_writes_trace_and_kernel_summary(tmp_path):
    """--profile-updates 2:3 through fairseq-train: a Chrome trace and the time by kind of two updates."""
    import gzip
    import json

    folder = tmp_path / "profile"
    result = fairseq_train(
        tiny_train_args(
            tmp_path / "ckpt",
            max_update=4,
            extra=["--no-save", "--profile-updates", "2:3", "--profile-dir", str(folder)],
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((folder / "kernels_rank0.json").read_text())
    assert summary["device"] == "cpu" and summary["updates"] == 2
    kinds = {k["kind"]: k["share"] for k in summary["kinds"]}
    assert kinds["matmul"] > 0.05 and sum(kinds.values()) == pytest.approx(1.0)
    assert "| matmul |" in (folder / "kernels_rank0.md").read_text()
    trace = json.loads(gzip.open(folder / "trace_rank0.json.gz").read())
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("aten::")}
    assert "aten::addmm" in steps or "aten::mm" in steps
    assert not list(folder.glob("*.tmp"))


def test_profile_updates_refuses_a_bad_range(tmp_path):
    result = fairseq_train(tiny_train_args(tmp_path / "ckpt", max_update=2, extra=["--profile-updates", "3:1"]))
    assert result.returncode != 0
    assert "fairseq_ext: error: --profile-updates (PROFILE_UPDATES) takes FIRST:LAST" in result.stderr
    assert "Traceback" not in result.stderr


def test_memory_snapshot_update_refuses_a_run_without_a_gpu(tmp_path):
    """MEMORY_SNAPSHOT_UPDATE records CUDA allocations: a CPU run says so in one line and stops."""
    result = fairseq_train(
        tiny_train_args(tmp_path / "ckpt", max_update=2, extra=["--no-save"]),
        extra_env={"MEMORY_SNAPSHOT_UPDATE": "2"},
    )
    assert result.returncode != 0
    assert "MEMORY_SNAPSHOT_UPDATE records CUDA allocations: unset it for a run without a GPU" in result.stderr
    assert "Traceback" not in result.stderr
