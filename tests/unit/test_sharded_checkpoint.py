"""Sharded checkpoints in one process: the folder is written under a temporary name and renamed, an
interrupted save leaves the previous checkpoint whole, folders no file names are removed, and a file
whose folder is missing, a bad --checkpoint-format, or an optimizer over flattened parameters is one
clear error."""

import os
from types import SimpleNamespace

import pytest
import torch

from fairseq_ext.cube import sharded_checkpoint
from fairseq_ext.cube.config import checkpoint_format
from fairseq_ext.cube.sharded_checkpoint import (
    check_optimizer_by_parameter,
    model_entries,
    optimizer_entries,
    read_checkpoint,
    remove_unreferenced_shards,
    shards_record,
    write_shards,
)
from fairseq_ext.errors import UserInputError


def trained(seed=0):
    """A small model and its Adam after one step."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    return model, optimizer


def shards(model, optimizer):
    names = [(name, p) for name, p in model.named_parameters()]
    return {**model_entries(model), **optimizer_entries(optimizer, names)}


def write_checkpoint_file(path, folder_name, model):
    """The small file fairseq's save writes for a sharded checkpoint (the entries its loader needs)."""
    record = {"param_groups": [{"lr": 0.1}], "param_names": [n for n, _ in model.named_parameters()], "extra": {}}
    torch.save(
        {
            "args": None,
            "cfg": None,
            "extra_state": {"train_iterator": {"epoch": 1}},
            "optimizer_history": [
                {"criterion_name": "c", "optimizer_name": "o", "lr_scheduler_state": {}, "num_updates": 1}
            ],
            "dcp": shards_record(folder_name, record),
        },
        path,
    )


def test_shards_are_written_under_a_temporary_name_then_renamed(tmp_path, monkeypatch):
    model, optimizer = trained()
    seen = []
    real_save = sharded_checkpoint.dcp.save

    def watching_save(state, checkpoint_id, **kwargs):
        seen.append((os.path.basename(checkpoint_id), sorted(os.listdir(tmp_path))))
        return real_save(state, checkpoint_id=checkpoint_id, **kwargs)

    monkeypatch.setattr(sharded_checkpoint.dcp, "save", watching_save)
    name = write_shards(str(tmp_path), shards(model, optimizer), 7)
    assert sharded_checkpoint.SHARDS_FOLDER.fullmatch(name) and name.startswith("shards-u7-")
    assert seen == [(f".{name}.tmp", [])]  # written under the temporary name; nothing under the final one
    assert sorted(os.listdir(tmp_path)) == [name]
    assert {".metadata", "__0_0.distcp"} <= set(os.listdir(tmp_path / name))


def test_interrupted_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    model, optimizer = trained()
    first = write_shards(str(tmp_path), shards(model, optimizer), 1)
    write_checkpoint_file(tmp_path / "checkpoint_last.pt", first, model)

    def killed_while_writing(state, checkpoint_id, **kwargs):
        os.makedirs(checkpoint_id)
        with open(os.path.join(checkpoint_id, "__0_0.distcp"), "wb") as half_written:
            half_written.write(b"half a file")
        raise KeyboardInterrupt  # the run stops here

    newer, _ = trained(seed=1)
    monkeypatch.setattr(sharded_checkpoint.dcp, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        write_shards(str(tmp_path), shards(newer, optimizer), 2)
    monkeypatch.undo()
    names = sorted(os.listdir(tmp_path))
    assert first in names and not [n for n in names if sharded_checkpoint.SHARDS_FOLDER.fullmatch(n) and n != first]
    state = read_checkpoint(str(tmp_path / "checkpoint_last.pt"))  # the previous checkpoint, whole
    for key, value in model.state_dict().items():
        torch.testing.assert_close(state["model"][key], value, rtol=0, atol=0)
    assert sorted(state["last_optimizer_state"]["state"]) == [0, 1, 2, 3]
    torch.testing.assert_close(
        state["last_optimizer_state"]["state"][0]["exp_avg"],
        optimizer.state[model[0].weight]["exp_avg"],
        rtol=0,
        atol=0,
    )

    # The next save removes what the interrupted one left; fairseq's cleanup then frees folders no file names.
    second = write_shards(str(tmp_path), shards(newer, optimizer), 3)
    assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint_last.pt", first, second])
    assert remove_unreferenced_shards(str(tmp_path)) == [second]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_last.pt", first]


def test_folders_no_file_names_are_removed(tmp_path):
    model, optimizer = trained()
    a, b, c = (write_shards(str(tmp_path), shards(model, optimizer), n) for n in (2, 4, 6))
    write_checkpoint_file(tmp_path / "checkpoint_1_4.pt", b, model)
    write_checkpoint_file(tmp_path / "checkpoint_last.pt", c, model)
    torch.save({"model": model.state_dict()}, tmp_path / "checkpoint_best.pt")  # a full checkpoint
    assert remove_unreferenced_shards(str(tmp_path)) == [a]
    os.remove(tmp_path / "checkpoint_1_4.pt")  # as fairseq's --keep-interval-updates does
    assert remove_unreferenced_shards(str(tmp_path)) == [b]
    assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint_best.pt", "checkpoint_last.pt", c])
    (tmp_path / "checkpoint_x.pt").write_bytes(b"not a checkpoint")  # unreadable: it might name any folder
    os.remove(tmp_path / "checkpoint_last.pt")
    assert remove_unreferenced_shards(str(tmp_path)) == []
    assert c in os.listdir(tmp_path)


def test_a_missing_shards_folder_is_one_clear_error(tmp_path):
    model, _ = trained()
    write_checkpoint_file(tmp_path / "checkpoint_last.pt", "shards-u1-abcdef.dcp", model)
    with pytest.raises(UserInputError, match=r"keeps its weights in the folder shards-u1-abcdef\.dcp beside it"):
        read_checkpoint(str(tmp_path / "checkpoint_last.pt"))


def test_checkpoint_format_auto_is_dcp_on_a_mesh_only():
    assert checkpoint_format(SimpleNamespace(checkpoint_format="auto"), on_mesh=True) == "dcp"
    assert checkpoint_format(SimpleNamespace(checkpoint_format="auto"), on_mesh=False) == "full"
    assert checkpoint_format(SimpleNamespace(checkpoint_format="full"), on_mesh=True) == "full"
    assert checkpoint_format(SimpleNamespace(checkpoint_format="dcp"), on_mesh=False) == "dcp"
    assert checkpoint_format(SimpleNamespace(), on_mesh=True) == "dcp"  # tasks without the setting
    with pytest.raises(UserInputError, match="unknown --checkpoint-format 'sharded'; choose one of auto, full, dcp"):
        checkpoint_format(SimpleNamespace(checkpoint_format="sharded"), on_mesh=True)


def test_an_optimizer_over_flattened_parameters_is_refused():
    """States are saved by parameter name: an optimizer stepping one flat copy of the parameters (fairseq's
    --fp16 without --fp16-no-flatten-grads) cannot be, and is refused with what to do instead."""
    model, _ = trained()
    params = list(model.named_parameters())
    flat = torch.nn.Parameter(torch.cat([p.detach().flatten() for _, p in params]))
    check_optimizer_by_parameter(torch.optim.Adam(model.parameters()), params)
    with pytest.raises(
        UserInputError,
        match=r"steps 1 tensors for the model's 4 trainable parameters .* "
        r"add --fp16-no-flatten-grads or use --checkpoint-format full",
    ):
        check_optimizer_by_parameter(torch.optim.Adam([flat]), params)


def test_strided_shards_of_gpt2_fused_qkv_are_recognised():
    """GPT-2's c_attn under tp is split in interleaved pieces, which DCP cannot save: auto falls back to full."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from fairseq_ext.cube.runtime.tensor_parallel import apply_tensor_parallel
    from fairseq_ext.cube.sharded_checkpoint import has_strided_shards

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_head=4, n_layer=1, vocab_size=64, n_positions=16))
    llama = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
        )
    )
    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (2,))
        apply_tensor_parallel(gpt2, mesh)
        apply_tensor_parallel(llama, mesh)
        assert has_strided_shards(gpt2)
        assert not has_strided_shards(llama)
    finally:
        dist.destroy_process_group()
