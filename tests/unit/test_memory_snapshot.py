"""MEMORY_SNAPSHOT_UPDATE's parsing and scripts/memory_snapshot_summary.py over a hand-made allocator snapshot."""

import importlib.util
import pickle
import subprocess
import sys

import pytest

from fairseq_ext.cube import memory_snapshot
from fairseq_ext.errors import UserInputError
from tests.helpers import REPO

MIB = 1024**2
SCRIPT = REPO / "scripts" / "memory_snapshot_summary.py"


def _summary_module():
    spec = importlib.util.spec_from_file_location("memory_snapshot_summary", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _frames(path, line=1, name="f"):
    return [{"filename": path, "line": line, "name": name}]


WEIGHTS = _frames("/x/site-packages/fairseq_ext/cube/runtime/fsdp.py", 80, "shard_data_parallel")
GATHER = _frames("/x/site-packages/torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py", 200, "foreach_all_gather")
ACTIVATION = _frames("/tmp/torchinductor_root/ab/cab.py", 10, "call")


def _snapshot():
    """Weights (100 MiB, live all along); a gathered copy (40 MiB) and an activation (60 MiB) that are freed
    before the end, and a 10 MiB buffer allocated after they are freed: the peak is 200 MiB, before the frees."""
    trace = [
        {"action": "alloc", "addr": 1, "size": 100 * MIB, "frames": WEIGHTS},
        {"action": "alloc", "addr": 2, "size": 40 * MIB, "frames": GATHER},
        {"action": "alloc", "addr": 3, "size": 60 * MIB, "frames": ACTIVATION},
        {"action": "free_requested", "addr": 3, "size": 60 * MIB, "frames": _frames("/x/torch/autograd/graph.py")},
        {"action": "free_completed", "addr": 3, "size": 60 * MIB, "frames": []},
        {"action": "free_requested", "addr": 2, "size": 40 * MIB, "frames": []},
        {"action": "free_completed", "addr": 2, "size": 40 * MIB, "frames": []},
        {"action": "alloc", "addr": 2, "size": 10 * MIB, "frames": ACTIVATION},
    ]
    blocks = [
        {"address": 1, "size": 100 * MIB, "state": "active_allocated", "frames": WEIGHTS},
        {"address": 2, "size": 10 * MIB, "state": "active_allocated", "frames": ACTIVATION},
        {"address": 5, "size": 7 * MIB, "state": "inactive", "frames": []},
    ]
    return {
        "segments": [{"device": 0, "blocks": blocks}],
        "device_traces": [trace],
        "fairseq_ext": {"update": 4, "max_memory_allocated": 200 * MIB},
    }


def test_peak_is_found_walking_back_and_grouped_by_allocation_site():
    module = _summary_module()
    summary = module.summarize(_snapshot())
    assert summary["peak_bytes"] == 200 * MIB
    by_category = {c["category"]: c["bytes"] for c in summary["categories"]}
    assert by_category == {
        "other": 100 * MIB,
        "FSDP2 (torch.distributed.fsdp)": 40 * MIB,
        "compiled code (inductor)": 60 * MIB,
    }
    top = summary["groups"][0]
    assert top["project_frame"] == "fairseq_ext/cube/runtime/fsdp.py:80 shard_data_parallel"
    assert "(torch.cuda.max_memory_allocated 0.20 GiB)" in module.summary_markdown(summary)


def test_script_writes_markdown_and_refuses_a_bad_file(tmp_path):
    path = tmp_path / "memory_snapshot_rank0.pickle"
    path.write_bytes(pickle.dumps(_snapshot()))
    out = tmp_path / "summary.md"
    subprocess.run([sys.executable, str(SCRIPT), str(path), "--out", str(out)], check=True)
    assert "| FSDP2 (torch.distributed.fsdp) | 0.039 | 1 |" in out.read_text()
    bad = tmp_path / "bad.pickle"
    bad.write_bytes(b"not a pickle")
    result = subprocess.run([sys.executable, str(SCRIPT), str(bad)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("memory_snapshot_summary: error: cannot read")


def test_update_parsing(monkeypatch):
    assert memory_snapshot.parse_update("") is None
    assert memory_snapshot.parse_update(" 4 ") == 4
    for bad in ("0", "3:4", "x"):
        with pytest.raises(UserInputError, match="MEMORY_SNAPSHOT_UPDATE takes one update"):
            memory_snapshot.parse_update(bad)
    monkeypatch.setenv("MEMORY_SNAPSHOT_UPDATE", "2")
    with pytest.raises(UserInputError, match="unset it for a run without a GPU"):
        memory_snapshot.from_environment("/tmp", 0, cuda=False)
    monkeypatch.delenv("MEMORY_SNAPSHOT_UPDATE")
    assert memory_snapshot.from_environment("/tmp", 0, cuda=False) is None
