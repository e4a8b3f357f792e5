"""torch_adamw: torch's AdamW for fp32 weights, float32 master weights for bf16 ones, bf16 states with
stochastic rounding (bf16-lean), and checkpoints that keep each state's dtype."""

import copy

import pytest
import torch

from fairseq_ext.cube.runtime.precision import check_precision
from fairseq_ext.errors import UserInputError
from fairseq_ext.optim.adamw import MixedPrecisionAdamW, stochastic_round_to_bf16

SETTINGS = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _params(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in ((7, 5), (11,))]


def _grads(step, shapes):
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(shape, generator=generator) for shape in shapes]


def _run(optimizer, params, steps, grad_dtype=None):
    for step in range(steps):
        for param, grad in zip(params, _grads(step, [p.shape for p in params])):
            param.grad = grad.to(grad_dtype or param.dtype)
        optimizer.step()


def test_fp32_weights_step_exactly_as_torch_adamw():
    ours, reference = _params(torch.float32), _params(torch.float32)
    _run(MixedPrecisionAdamW(ours, **SETTINGS), ours, 5)
    _run(torch.optim.AdamW(reference, **SETTINGS), reference, 5)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bf16_weights_follow_float32_master_weights():
    bf16 = _params(torch.bfloat16)
    master_reference = [torch.nn.Parameter(p.detach().float()) for p in bf16]
    optimizer = MixedPrecisionAdamW(bf16, **SETTINGS)
    reference = torch.optim.AdamW(master_reference, **SETTINGS)
    for step in range(5):
        grads = _grads(step, [p.shape for p in bf16])
        for param, ref, grad in zip(bf16, master_reference, grads):
            param.grad = grad.bfloat16()
            ref.grad = grad.bfloat16().float()  # the same gradient the model produced
        optimizer.step()
        reference.step()
    for param, ref in zip(bf16, master_reference):
        state = optimizer.state[param]
        assert state["master"].dtype == state["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(state["master"], ref.detach(), rtol=0, atol=0)
        assert torch.equal(param.detach(), ref.detach().bfloat16())


def test_master_weights_keep_updates_smaller_than_bf16_resolution():
    param = torch.nn.Parameter(torch.ones(1000, dtype=torch.bfloat16))
    optimizer = MixedPrecisionAdamW([param], lr=1e-4, betas=(0.9, 0.95))
    for _ in range(100):  # each update (1e-4) is below bf16's spacing at 1.0 (2**-7), 100 of them are not
        param.grad = torch.ones_like(param)
        optimizer.step()
    assert torch.allclose(optimizer.state[param]["master"], torch.full((1000,), 1 - 1e-2), atol=1e-4)
    assert param.detach().float().mean().item() == pytest.approx(0.99, abs=4e-3)


def test_stochastic_rounding_is_unbiased_and_exact_on_bf16_values():
    value = torch.full((200_000,), 1.0 + 2**-10)  # a quarter of the way between bf16 neighbours 1 and 1 + 2**-7
    rounded = stochastic_round_to_bf16(value, torch.Generator().manual_seed(0)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert rounded.mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)
    negative = stochastic_round_to_bf16(-value, torch.Generator().manual_seed(1)).float()
    assert negative.mean().item() == pytest.approx(-(1.0 + 2**-10), abs=2e-5)
    exact = torch.tensor([0.5, -3.0, 1.0 + 2**-7])
    assert torch.equal(stochastic_round_to_bf16(exact).float(), exact)


def test_lean_states_are_bf16_and_small_updates_survive_on_average():
    param = torch.nn.Parameter(torch.ones(100_000, dtype=torch.bfloat16))
    optimizer = MixedPrecisionAdamW([param], lr=1e-4, betas=(0.9, 0.95), lean_states=True)
    for _ in range(100):
        param.grad = torch.ones_like(param)
        optimizer.step()
    state = optimizer.state[param]
    assert "master" not in state and state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    # round-to-nearest would leave every weight at 1.0; stochastic rounding moves the mean by 100 * 1e-4
    assert param.detach().float().mean().item() == pytest.approx(0.99, abs=1e-3)


def test_lean_step_matches_float32_adamw_on_one_step():
    lean, reference = _params(torch.bfloat16), _params(torch.bfloat16)
    reference = [torch.nn.Parameter(p.detach().float()) for p in reference]
    _run(MixedPrecisionAdamW(lean, **SETTINGS, lean_states=True), lean, 1)
    _run(torch.optim.AdamW(reference, **SETTINGS), reference, 1, grad_dtype=torch.float32)
    for a, b in zip(lean, reference):
        torch.testing.assert_close(a.detach().float(), b.detach(), rtol=0, atol=2**-6)


@pytest.mark.parametrize("lean", [False, True])
def test_state_dict_round_trip_keeps_state_dtypes_and_resumes_exactly(lean):
    params = _params(torch.bfloat16)
    optimizer = MixedPrecisionAdamW(params, **SETTINGS, lean_states=lean)
    _run(optimizer, params, 2)
    saved_params, saved_state = copy.deepcopy(params), copy.deepcopy(optimizer.state_dict())
    for param_state in saved_state["state"].values():  # fairseq's checkpoints hold bf16 tensors as float32
        for key, value in param_state.items():
            if key != "step":
                param_state[key] = value.float()

    resumed = [torch.nn.Parameter(p.detach().clone()) for p in saved_params]
    optimizer_resumed = MixedPrecisionAdamW(resumed, **SETTINGS, lean_states=lean)
    optimizer_resumed.load_state_dict(saved_state)
    for param, resumed_param in zip(params, resumed):
        for key, value in optimizer.state[param].items():
            assert optimizer_resumed.state[resumed_param][key].dtype == value.dtype, key
    if lean:  # stochastic rounding draws from the optimizer's own generator: compare one deterministic step
        return
    _run(optimizer, params, 2)
    _run(optimizer_resumed, resumed, 2)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


def test_bf16_weight_precisions_need_torch_adamw():
    check_precision("bf16-master", optimizer="torch_adamw")
    with pytest.raises(UserInputError, match="--optimizer torch_adamw"):
        check_precision("bf16-lean", optimizer="adam")
    with pytest.raises(UserInputError, match="unknown precision"):
        check_precision("bf16-pure")


def _fairseq_optimizer(params, precision="fp32"):
    from omegaconf import OmegaConf

    from fairseq_ext.optim.torch_adamw import FairseqTorchAdamW

    cfg = OmegaConf.create(
        {"adam_betas": "(0.9, 0.95)", "adam_eps": 1e-8, "weight_decay": 0.1, "precision": precision, "lr": [1e-2]}
    )
    return FairseqTorchAdamW(cfg, params)


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 1e3])
def test_fairseq_scaling_and_clipping_fold_into_the_step(max_norm):
    """multiply_grads and clip_grad_norm leave the gradients alone and the step applies both: the same
    weights and norm as scaling, clipping (torch's clip_grad_norm_) and stepping one after the other."""
    ours, reference = _params(torch.float32), _params(torch.float32)
    optimizer, torch_optimizer = (
        _fairseq_optimizer(ours),
        torch.optim.AdamW(reference, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1),
    )
    for step in range(3):
        grads = _grads(step, [p.shape for p in ours])
        for a, b, grad in zip(ours, reference, grads):
            a.grad, b.grad = grad.clone(), grad.clone()
        optimizer.multiply_grads(0.25)
        norm = optimizer.clip_grad_norm(max_norm)
        assert torch.equal(ours[0].grad, grads[0])  # untouched until the step
        for b in reference:
            b.grad.mul_(0.25)
        expected_norm = torch.nn.utils.clip_grad_norm_(reference, max_norm if max_norm > 0 else float("inf"))
        torch.testing.assert_close(norm, expected_norm, rtol=1e-6, atol=0)
        optimizer.step()
        torch_optimizer.step()
        optimizer.zero_grad()
        torch_optimizer.zero_grad()
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_clipping_by_a_given_norm_folds_into_the_step_like_clip_grad_norm():
    """A model split over processes clips by the norm summed over the splits (``clip_by_norm``): given the
    norm of the gradients as they are, the same norm and weights as ``clip_grad_norm``, gradients untouched."""
    given, computed = _params(torch.float32), _params(torch.float32)
    by_norm, by_grads = _fairseq_optimizer(given), _fairseq_optimizer(computed)
    for step in range(3):
        grads = _grads(step, [p.shape for p in given])
        for a, b, grad in zip(given, computed, grads):
            a.grad, b.grad = grad.clone(), grad.clone()
        by_norm.multiply_grads(0.25)
        by_grads.multiply_grads(0.25)
        norm_of_grads = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        norm = by_norm.clip_by_norm(norm_of_grads, 0.5)
        torch.testing.assert_close(norm, by_grads.clip_grad_norm(0.5), rtol=1e-6, atol=0)
        assert torch.equal(given[0].grad, grads[0])
        by_norm.step()
        by_grads.step()
        by_norm.zero_grad()
        by_grads.zero_grad()
    for a, b in zip(given, computed):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_lean_states_loaded_as_float32_become_bf16_again():
    """ZeroRedundancyOptimizer loads states as saved (fairseq saves bf16 as float32): the next step puts the
    lean moments back in bf16 instead of keeping twice their memory."""
    params = _params(torch.bfloat16)
    optimizer = MixedPrecisionAdamW(params, **SETTINGS, lean_states=True)
    _run(optimizer, params, 1)
    for state in optimizer.state.values():
        state["exp_avg"], state["exp_avg_sq"] = state["exp_avg"].float(), state["exp_avg_sq"].float()
    _run(optimizer, params, 1)
    assert {s[k].dtype for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")} == {torch.bfloat16}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_norm_makes_the_step_change_nothing(dtype):
    """skip_step_if_nonfinite: the step launched after a NaN norm leaves weights, master weights, moments and
    step counts as they were (decided by the fused kernel); the next finite step goes on as if it never ran."""
    ours, reference = _params(dtype), _params(dtype)
    optimizer, reference_optimizer = _fairseq_optimizer(ours), _fairseq_optimizer(reference)
    for step in range(3):
        grads = _grads(step, [p.shape for p in ours])
        for a, b, grad in zip(ours, reference, grads):
            a.grad, b.grad = grad.to(dtype), grad.to(dtype)
        if step == 1:  # a NaN gradient: ours skips it, the reference never sees it
            ours[0].grad[0, 0] = float("nan")
            before = copy.deepcopy(optimizer.optimizer.state_dict()), [p.detach().clone() for p in ours]
        norm = optimizer.clip_grad_norm(1.0)
        assert optimizer.skip_step_if_nonfinite(norm)
        optimizer.step()
        optimizer.zero_grad()
        if step == 1:
            assert not torch.isfinite(norm)
            for p, saved in zip(ours, before[1]):
                assert torch.equal(p, saved)
            after = optimizer.optimizer.state_dict()["state"]
            for index, state in before[0]["state"].items():
                for key, value in state.items():
                    assert torch.equal(after[index][key], value), key
            continue
        reference_optimizer.clip_grad_norm(1.0)
        reference_optimizer.step()
        reference_optimizer.zero_grad()
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_lean_step_skips_itself_where_the_norm_is_not_finite():
    """bf16-lean's step also takes found_inf: after a NaN norm weights, moments and step counts stay as they
    were (so fairseq's trainer need not wait for the norm), and the next step goes on from there."""
    params = _params(torch.bfloat16)
    optimizer = _fairseq_optimizer(params, precision="bf16-lean")
    for step in range(3):
        for p, grad in zip(params, _grads(step, [p.shape for p in params])):
            p.grad = grad.bfloat16()
        if step == 1:
            params[0].grad[0, 0] = float("nan")
            before = copy.deepcopy(optimizer.optimizer.state_dict()), [p.detach().clone() for p in params]
        assert optimizer.skip_step_if_nonfinite(optimizer.clip_grad_norm(1.0))
        optimizer.step()
        optimizer.zero_grad()
        if step == 1:
            assert all(torch.equal(p, saved) for p, saved in zip(params, before[1]))
            after = optimizer.optimizer.state_dict()["state"]
            for index, state in before[0]["state"].items():
                for key, value in state.items():
                    assert torch.equal(after[index][key], value), key
    assert all(torch.isfinite(p).all() for p in params)
    assert {s["step"].item() for s in optimizer.optimizer.state.values()} == {2.0}
