"""GPT-2 under tensor parallel (DTensor, gloo, 2 CPU ranks): Conv1D projections, q/k/v fused in ``c_attn``.

Each rank must compute its own heads of q, k and v, and every parameter must still gather to the
single-process layout (``c_attn.weight`` (hidden, 3 x hidden), columns ``[q | k | v]``), so that the same
logits, loss, gradients, gradient norm and state_dict come out as in one process.
"""

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import loss_parallel
from torch.distributed.tensor.placement_types import _StridedShard
from transformers import GPT2Config, GPT2LMHeadModel

from fairseq_ext.cube.runtime.local_shards import LocalShards, full_state_dict, localize_state_dict
from fairseq_ext.cube.runtime.tensor_parallel import apply_tensor_parallel, apply_vocab_parallel, check_divisible
from fairseq_ext.errors import UserInputError
from tests.distributed.test_tensor_parallel import full, init_group
from tests.helpers import spawn_ranks

HIDDEN, HEADS = 32, 4


def tiny_gpt2(seed=0, tied=True):
    config = GPT2Config(
        vocab_size=64,
        n_embd=HIDDEN,
        n_head=HEADS,
        n_layer=2,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def input_ids():
    return torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))


def forward_backward(model, loss_context=contextlib.nullcontext):
    """Logits (full), the next-token loss after backward, full gradients and the global gradient norm."""
    ids = input_ids()
    with loss_context():
        logits = model(input_ids=ids).logits  # (B, T, V), a DTensor sharded on V under vocab parallel
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
    grads = {name: full(p.grad) for name, p in model.named_parameters()}
    norm = LocalShards(model.parameters()).grad_norm()
    return {"logits": full(logits.detach()), "loss": full(loss.detach()), "grads": grads, "norm": norm}


def own_heads_of_c_attn(full_weight, rank, tp):
    """Columns of [q | k | v] that hold rank ``rank``'s heads: its slice of q, then of k, then of v."""
    width = HIDDEN // tp
    return torch.cat(
        [full_weight[:, part * HIDDEN + rank * width : part * HIDDEN + (rank + 1) * width] for part in range(3)], dim=1
    )


def worker(rank, world_size, out, tied):
    init_group(rank, world_size, out)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        model = tiny_gpt2(tied=tied)
        c_attn = model.transformer.h[0].attn.c_attn.weight.detach().clone()
        mesh = init_device_mesh("cpu", (world_size,))
        result = {"num_sharded": apply_tensor_parallel(model, mesh)}
        context = contextlib.nullcontext
        if not tied:
            apply_vocab_parallel(model, mesh)
            context = loss_parallel
        attn = model.transformer.h[0].attn
        result["c_attn_placements"] = attn.c_attn.weight.placements
        result["own_heads"] = torch.equal(attn.c_attn.weight.to_local(), own_heads_of_c_attn(c_attn, rank, world_size))
        result["split_size"] = attn.split_size
        result["tied"] = model.lm_head.weight is model.transformer.wte.weight
        result["sharded"] = sorted(n for n, p in model.named_parameters() if hasattr(p, "full_tensor"))
        with CommDebugMode() as comm:
            model(input_ids=input_ids())
        result["forward_comms"] = {str(op): count for op, count in comm.get_comm_counts().items()}
        result.update(forward_backward(model, context))
        result["state"] = {k: v.clone() for k, v in full_state_dict(model.state_dict()).items()}  # before the reload
        # A single-process state_dict (another seed) loads into the shards and gathers back unchanged.
        other = tiny_gpt2(seed=1, tied=tied).state_dict()
        model.load_state_dict(localize_state_dict(model, other))
        reloaded = full_state_dict(model.state_dict())
        result["reloaded"] = all(torch.equal(value, other[key]) for key, value in reloaded.items())
        torch.save(result, f"{out}/rank{rank}.pt")
        dist.barrier()  # no rank tears the group down while another is still in a collective
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied+vocab"])
def test_gpt2_tp2_matches_single_process(tmp_path, tied):
    spawn_ranks(worker, (2, str(tmp_path), tied), nprocs=2)
    reference_model = tiny_gpt2(tied=tied)
    reference = forward_backward(reference_model)
    reference_state = reference_model.state_dict()
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert result["num_sharded"] == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj of 2 blocks
        assert result["c_attn_placements"] == (_StridedShard(1, split_factor=3),)
        assert result["own_heads"] and result["split_size"] == HIDDEN // 2
        # Megatron: one all-reduce after attn.c_proj and one after mlp.c_proj per block (+ the vocab-parallel lookup)
        assert result["forward_comms"] == {"c10d_functional.all_reduce": 2 * 2 + (0 if tied else 1)}
        assert result["tied"] == tied
        assert len(result["sharded"]) == 16 + (0 if tied else 2), result["sharded"]  # + wte and lm_head
        torch.testing.assert_close(result["logits"], reference["logits"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result["loss"], reference["loss"], rtol=1e-5, atol=0)
        assert result["grads"].keys() == reference["grads"].keys()
        for name, grad in result["grads"].items():
            assert grad.shape == reference["grads"][name].shape, name  # full tensors, single-process layout
            torch.testing.assert_close(
                grad, reference["grads"][name], rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
            )
        torch.testing.assert_close(result["norm"], reference["norm"], rtol=1e-5, atol=0)
        assert result["state"].keys() == reference_state.keys()
        for key, value in reference_state.items():
            assert torch.equal(result["state"][key], value), key  # the checkpoint layout of one process
        assert result["reloaded"]


def test_gpt2_tp_must_divide_heads_and_ffn():
    config = tiny_gpt2().config
    with pytest.raises(UserInputError, match="tp 3 does not divide num_attention_heads 4"):
        check_divisible(config, 3)
    config.n_head, config.n_inner = 8, 100
    with pytest.raises(UserInputError, match="tp 8 does not divide n_inner 100"):
        check_divisible(config, 8)
    config.n_inner = None  # 4 x n_embd = 128
    check_divisible(config, 8)
