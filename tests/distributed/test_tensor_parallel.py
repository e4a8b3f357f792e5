"""Tensor parallel (DTensor, gloo, 2 CPU ranks) gives the single-process losses, gradients and weights."""

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import loss_parallel
from transformers import LlamaConfig, LlamaForCausalLM

from fairseq_ext.cube.runtime.tensor_parallel import apply_tensor_parallel, apply_vocab_parallel, check_divisible
from fairseq_ext.errors import UserInputError
from tests.helpers import spawn_ranks

STEPS = 4


def tiny_llama(seed=0):
    config = LlamaConfig(
        vocab_size=96,
        tie_word_embeddings=False,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def batches():
    generator = torch.Generator().manual_seed(1)
    first, second = (torch.randint(3, 96, (3, 12), generator=generator) for _ in range(2))
    return [first, second] * (STEPS // 2)  # seen twice, so the loss visibly falls


def next_token_loss(model, input_ids):
    logits = model(input_ids=input_ids).logits  # (B, T, V), a DTensor sharded on V under vocab parallel
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


def train(model, data, loss_context=contextlib.nullcontext):
    """A few SGD steps (Adam would amplify rounding noise in near-zero gradients); losses and first gradients."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, foreach=False)
    losses, first_grads = [], None
    for input_ids in data:
        with loss_context():
            loss = next_token_loss(model, input_ids)
            loss.backward()
        loss = full(loss)
        if first_grads is None:
            first_grads = {n: full(p.grad) for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, first_grads


def full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach().clone()


def init_group(rank, world_size, out):
    """gloo over a rendezvous file in the test's own folder: no TCP port another run could take."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world_size)


def worker(rank, world_size, out, vocab_parallel):
    init_group(rank, world_size, out)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        data = batches()
        model = tiny_llama()
        mesh = init_device_mesh("cpu", (world_size,))
        assert apply_tensor_parallel(model, mesh) == 14
        context = contextlib.nullcontext
        if vocab_parallel:
            apply_vocab_parallel(model, mesh)
            logits = model(input_ids=data[0]).logits
            assert isinstance(logits, DTensor) and logits.placements == (Shard(2),)
            assert logits.to_local().shape == (3, 12, 96 // world_size)  # full-vocabulary logits never exist
            context = loss_parallel
        sharded = [n for n, p in model.named_parameters() if hasattr(p, "full_tensor")]
        losses, grads = train(model, data, context)
        weights = {n: full(p) for n, p in model.named_parameters()}
        torch.save({"losses": losses, "grads": grads, "sharded": sharded, "weights": weights}, f"{out}/rank{rank}.pt")
        dist.barrier()  # no rank tears the group down while another is still in a collective
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("vocab_parallel", [False, True], ids=["layers", "layers+vocab"])
def test_tp2_matches_single_process(tmp_path, vocab_parallel):
    spawn_ranks(worker, (2, str(tmp_path), vocab_parallel), nprocs=2)
    reference = tiny_llama()  # the single-process run, here in the parent, from the same seed and data
    ref_losses, ref_grads = train(reference, batches())
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        expected_sharded = 14 + (2 if vocab_parallel else 0)
        assert len(result["sharded"]) == expected_sharded, result["sharded"]
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=0)
        assert ref_losses[-1] < ref_losses[0] - 0.1, ref_losses  # the steps really train
        for name, grad in result["grads"].items():
            torch.testing.assert_close(
                grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
            )
        for name, weight in result["weights"].items():
            torch.testing.assert_close(
                weight,
                dict(reference.named_parameters())[name].detach(),
                rtol=1e-5,
                atol=1e-6,
                msg=lambda m, name=name: f"{name}: {m}",
            )


def test_tp_must_divide_heads_and_ffn():
    config = tiny_llama().config
    with pytest.raises(UserInputError, match="tp 3 does not divide num_attention_heads 4"):
        check_divisible(config, 3)
    config.num_attention_heads = 8
    with pytest.raises(UserInputError, match="tp 4 does not divide num_key_value_heads 2"):
        check_divisible(config, 4)


class FusedQKVAttention(torch.nn.Module):
    """A custom attention: one fused q/k/v projection, which the Llama tp plan's q/k/v rules do not name,
    but whose ``o_proj`` they do: sharding o_proj alone would break it, so it is registered to stay whole."""

    def __init__(self, config):
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.sizes = [config.num_attention_heads * self.head_dim] + [config.num_key_value_heads * self.head_dim] * 2
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.qkv = torch.nn.Linear(config.hidden_size, sum(self.sizes), bias=False)
        self.o_proj = torch.nn.Linear(self.sizes[0], config.hidden_size, bias=False)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

        batch, length, _ = hidden_states.shape
        q, k, v = (
            x.view(batch, length, -1, self.head_dim).transpose(1, 2)
            for x in self.qkv(hidden_states).split(self.sizes, dim=-1)
        )
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        out, weights = eager_attention_forward(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling)
        return self.o_proj(out.reshape(batch, length, -1)), weights


def tiny_llama_with_custom_attention(seed=0):
    model = tiny_llama(seed)
    model.config._attn_implementation = "eager"  # a full causal mask for the custom attention
    torch.manual_seed(seed + 1)
    for layer in model.model.layers:
        layer.self_attn = FusedQKVAttention(model.config)
    return model


def custom_worker(rank, world_size, out):
    from fairseq_ext.cube.custom import CUSTOM_MODULES, register_module

    init_group(rank, world_size, out)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        register_module(FusedQKVAttention)  # stays whole; the MLPs are still sharded by the Llama rules
        model = tiny_llama_with_custom_attention()
        num_sharded = apply_tensor_parallel(model, init_device_mesh("cpu", (world_size,)))
        CUSTOM_MODULES.clear()
        sharded = [n for n, p in model.named_parameters() if hasattr(p, "full_tensor")]
        losses, grads = train(model, batches())
        torch.save(
            {
                "losses": losses,
                "sharded": sharded,
                "num_sharded": num_sharded,
                "weights": {n: full(p) for n, p in model.named_parameters()},
            },
            f"{out}/rank{rank}.pt",
        )
        dist.barrier()  # no rank tears the group down while another is still in a collective
    finally:
        dist.destroy_process_group()


def test_registered_custom_attention_stays_whole_and_matches_single_process(tmp_path):
    spawn_ranks(custom_worker, (2, str(tmp_path)), nprocs=2)
    reference = tiny_llama_with_custom_attention()
    ref_losses, _ = train(reference, batches())
    assert ref_losses[2] < ref_losses[0] - 0.1, ref_losses  # the first batch again, after two steps
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["num_sharded"] == 6  # gate/up/down of 2 layers; nothing of the custom attention
        assert result["sharded"] and not any("self_attn" in n for n in result["sharded"]), result["sharded"]
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=0)
        for name, weight in result["weights"].items():
            torch.testing.assert_close(
                weight,
                dict(reference.named_parameters())[name].detach(),
                rtol=1e-5,
                atol=1e-6,
                msg=lambda m, name=name: f"{name}: {m}",
            )


def test_register_module_rejects_unknown_styles():
    from fairseq_ext.cube.custom import register_module

    with pytest.raises(UserInputError, match=r"register_module\(MyMLP\): tensor-parallel styles \['diagonal'\]"):
        register_module("MyMLP", tp_rules={"up": "diagonal"})
