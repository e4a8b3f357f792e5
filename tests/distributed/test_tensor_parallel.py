"""Tensor parallel (DTensor, gloo, 2 CPU ranks) gives the single-process losses, gradients and weights."""

import contextlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import loss_parallel
from transformers import LlamaConfig, LlamaForCausalLM

from fairseq_ext.cube.runtime.tensor_parallel import apply_tensor_parallel, apply_vocab_parallel, check_divisible
from fairseq_ext.errors import UserInputError

STEPS = 4


def tiny_llama(seed=0):
    config = LlamaConfig(vocab_size=96, tie_word_embeddings=False, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
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


def worker(rank, world_size, port, out, vocab_parallel):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
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
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("vocab_parallel", [False, True], ids=["layers", "layers+vocab"])
def test_tp2_matches_single_process(tmp_path, vocab_parallel):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path), vocab_parallel), nprocs=2, join=True)
    reference = tiny_llama()  # the single-process run, here in the parent, from the same seed and data
    ref_losses, ref_grads = train(reference, batches())
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        expected_sharded = 14 + (2 if vocab_parallel else 0)
        assert len(result["sharded"]) == expected_sharded, result["sharded"]
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=0)
        assert ref_losses[-1] < ref_losses[0] - 0.1, ref_losses  # the steps really train
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        for name, weight in result["weights"].items():
            torch.testing.assert_close(weight, dict(reference.named_parameters())[name].detach(),
                                       rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_tp_must_divide_heads_and_ffn():
    config = tiny_llama().config
    with pytest.raises(UserInputError, match="tp 3 does not divide num_attention_heads 4"):
        check_divisible(config, 3)
    config.num_attention_heads = 8
    with pytest.raises(UserInputError, match="tp 4 does not divide num_key_value_heads 2"):
        check_divisible(config, 4)
