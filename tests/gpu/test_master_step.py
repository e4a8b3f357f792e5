"""On a GPU: torch_adamw steps bf16 weights with float32 masters by one Triton kernel (``master_step``), with
the numbers of torch's fused step on float32 copies of the gradients (the path it replaces, and the CPU's),
and skips a step where found_inf is set.

Runs on the GPU machine (``python -m pytest -q tests/gpu``).
"""

import pytest
import torch

from fairseq_ext.optim import master_step
from fairseq_ext.optim.adamw import MixedPrecisionAdamW

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# a block and a bit, a LoRA-sized matrix, a norm's vector, one element, a 1.1B model's k_proj
SHAPES = [(master_step.BLOCK + 3,), (16, 4096), (2048,), (1,), (256, 2048)]


def _weights(seed: int):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(shape, device="cuda", generator=generator).to(torch.bfloat16))
        for shape in SHAPES
    ]


def _run(weights, updates):
    optimizer = MixedPrecisionAdamW(weights, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator(device="cuda").manual_seed(7)
    for update in range(updates):
        for weight in weights:
            weight.grad = torch.randn(weight.shape, device="cuda", generator=generator).to(torch.bfloat16)
        optimizer.param_groups[0]["lr"] = 1e-3 / (update + 1)
        optimizer.step(grad_scale=torch.tensor(0.5, device="cuda"))
    return optimizer


def test_triton_master_step_matches_torchs_fused_step(monkeypatch):
    launches = []
    original = master_step.MasterAdamWStep.__call__

    def counted(self, params, *args):
        launches.append(len(params))
        return original(self, params, *args)

    monkeypatch.setattr(master_step.MasterAdamWStep, "__call__", counted)
    triton_weights = _weights(0)
    triton = _run(triton_weights, updates=3)
    assert launches == [len(SHAPES)] * 3

    monkeypatch.setattr(master_step, "triton_available", lambda: False)  # as without Triton: torch's fused step
    launches.clear()
    torch_weights = _weights(0)
    reference = _run(torch_weights, updates=3)
    assert launches == []
    for mine, theirs in zip(triton_weights, torch_weights):
        mine_state, their_state = triton.state[mine], reference.state[theirs]
        torch.testing.assert_close(mine_state["master"], their_state["master"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine_state["exp_avg"], their_state["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(mine_state["exp_avg_sq"], their_state["exp_avg_sq"], rtol=1e-5, atol=0)
        assert mine_state["step"].item() == their_state["step"].item() == 3
        assert torch.equal(mine.detach(), mine_state["master"].to(torch.bfloat16))


def test_found_inf_leaves_weights_states_and_step_counts():
    weights = _weights(1)
    optimizer = _run(weights, updates=1)
    before = [(w.detach().clone(), {k: v.clone() for k, v in optimizer.state[w].items()}) for w in weights]
    for weight in weights:
        weight.grad = torch.full_like(weight, float("nan"))
    optimizer.step(found_inf=torch.ones((), device="cuda"))
    for weight, (value, state) in zip(weights, before):
        assert torch.equal(weight.detach(), value)
        for key, tensor in state.items():
            assert torch.equal(optimizer.state[weight][key], tensor), key


@pytest.mark.parametrize("with_found_inf", [False, True])
def test_step_never_waits_for_the_device(with_found_inf):
    weights = _weights(2)
    optimizer = _run(weights, updates=1)  # builds the states and the kernel
    scale = torch.tensor(0.5, device="cuda")
    found_inf = torch.zeros((), device="cuda") if with_found_inf else None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        optimizer.step(grad_scale=scale, found_inf=found_inf)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(optimizer.state[w]["step"].item() == 2 for w in weights)


def test_fsdp2_local_shards_take_the_kernel(monkeypatch):
    """bf16-master on FSDP2 (one GPU at USE_ZERO=3, a mesh of one rank): the optimizer's local shards of the
    DTensor weights go to the one-launch kernel, all of them in one launch per update, and two updates give the
    plain model's weights (stepped by the same kernel) to bf16 rounding."""
    import torch.distributed as dist

    from tests.distributed.test_fsdp_bf16_master import sharded_tiny_llama, train_updates

    launches = []
    original = master_step.MasterAdamWStep.__call__

    def counted(self, params, *args):
        launches.append(len(params))
        return original(self, params, *args)

    monkeypatch.setattr(master_step.MasterAdamWStep, "__call__", counted)
    try:
        plain, sharded = sharded_tiny_llama(torch.device("cuda"))
        _, views = train_updates(sharded)
        assert launches == [len(views)] * 2 and len(views) == len(list(plain.parameters()))
        launches.clear()
        train_updates(plain)
        assert launches == [len(views)] * 2
        full = {name: p.full_tensor() for name, p in sharded.named_parameters()}
        for name, value in plain.named_parameters():
            torch.testing.assert_close(full[name], value.detach(), rtol=1e-2, atol=1e-3)
    finally:
        dist.destroy_process_group()
