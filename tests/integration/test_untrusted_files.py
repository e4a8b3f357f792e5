"""No checkpoint file runs code: a pickle with a payload planted in a checkpoint folder (full and sharded),
or given to export and evaluate, is refused in one line or left alone, and its payload never runs."""

import argparse
import pickle

import pytest
import torch

from fairseq_ext.errors import UserInputError
from fairseq_ext.safe_load import SafeFileSystemReader, load_checkpoint_file
from scripts import evaluate, export_hf
from tests.helpers import fairseq_train, tiny_train_args


class Payload:
    """Unpickling this runs ``exec``: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def plant(path, marker) -> None:
    torch.save({"model": {"w": torch.zeros(2)}, "extra_state": Payload(marker)}, path)


def one_refusal(returncode, stderr, path):
    assert returncode != 0
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "refused to read" in errors[0] and str(path) in errors[0], stderr[-3000:]


def script_refusal(capsys, main, argv, path):
    """A script's ``main`` run in this process (as its command line runs it), refusing ``path``."""
    capsys.readouterr()
    returncode = main(list(map(str, argv)))
    one_refusal(returncode, capsys.readouterr().err, path)


def test_allowlist_reads_checkpoint_values_and_refuses_code(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"args": argparse.Namespace(lr=[0.1]), "model": {"w": torch.ones(3)}}, path)
    state = load_checkpoint_file(path)
    assert state["args"].lr == [0.1] and torch.equal(state["model"]["w"], torch.ones(3))
    marker = tmp_path / "ran"
    plant(tmp_path / "evil.pt", marker)
    with pytest.raises(UserInputError, match=r"evil\.pt: refused to read: it asks for exec,"):
        load_checkpoint_file(tmp_path / "evil.pt")
    (tmp_path / "shards").mkdir()
    with open(tmp_path / "shards" / ".metadata", "wb") as file:
        pickle.dump(Payload(marker), file)
    with pytest.raises(UserInputError, match=r"\.metadata: refused to read"):
        SafeFileSystemReader(str(tmp_path / "shards")).read_metadata()
    assert not marker.exists()


def test_planted_pickles_never_run(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    # a sharded run: a planted *.pt beside its files is read at every save's cleanup, and left alone
    dcp_dir = tmp_path / "dcp"
    dcp_dir.mkdir()
    plant(dcp_dir / "planted.pt", marker)
    extra = ["--checkpoint-format", "dcp", "--save-interval-updates", "1"]
    trained = fairseq_train(tiny_train_args(dcp_dir, max_update=2, extra=extra))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "planted.pt: refused to read" in trained.stdout + trained.stderr
    assert not marker.exists()

    # a full run whose checkpoint_last.pt was replaced: the resume refuses it in one line
    full_dir = tmp_path / "full"
    full_dir.mkdir()
    plant(full_dir / "checkpoint_last.pt", marker)
    resumed = fairseq_train(tiny_train_args(full_dir, max_update=2))
    one_refusal(resumed.returncode, resumed.stderr, full_dir / "checkpoint_last.pt")

    # a checkpoint given to export and evaluate
    evil = full_dir / "checkpoint_last.pt"
    script_refusal(capsys, export_hf.main, [evil, tmp_path / "hf"], evil)
    script_refusal(capsys, evaluate.main, ["--checkpoint", evil], evil)

    # a sharded checkpoint whose shards folder's metadata was replaced
    folder = next(dcp_dir.glob("shards-u2-*.dcp"))
    with open(folder / ".metadata", "wb") as file:
        pickle.dump(Payload(marker), file)
    script_refusal(capsys, export_hf.main, [dcp_dir / "checkpoint_last.pt", tmp_path / "hf"], folder / ".metadata")
    assert not marker.exists() and not (tmp_path / "hf").exists()
