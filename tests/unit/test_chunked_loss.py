import pytest
import torch
import torch.nn.functional as F

from fairseq_ext.cube.runtime.chunked_loss import linear_cross_entropy

N, H, V = 40, 16, 50
IGNORE = -100


def reference(hidden, weight, target, ignore_index=IGNORE, chunk_size=None):
    return F.cross_entropy((hidden @ weight.T).float(), target, ignore_index=ignore_index, reduction="sum")


def make_inputs(n=N, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=generator).to(dtype)
    weight = (0.5 * torch.randn(V, H, generator=generator)).to(dtype)
    target = torch.randint(0, V, (n,), generator=generator)
    return hidden, weight, target


def loss_and_grads(fn, hidden, weight, target, scale=1.0, hidden_grad=True, weight_grad=True, **kwargs):
    hidden = hidden.clone().requires_grad_(hidden_grad)
    weight = weight.clone().requires_grad_(weight_grad)
    loss = fn(hidden, weight, target, **kwargs)
    (loss * scale).backward()
    return loss.detach(), hidden.grad, weight.grad


def assert_matches_reference(hidden, weight, target, **kwargs):
    ours = loss_and_grads(linear_cross_entropy, hidden, weight, target, **kwargs)
    ref = loss_and_grads(reference, hidden, weight, target, **kwargs)
    assert ours[0].dtype == torch.float32 and ours[0].dim() == 0
    for got, expected in zip(ours, ref):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    return ours


@pytest.mark.parametrize("chunk_size", [8, 7, N, 64])
def test_matches_reference_with_some_targets_ignored(chunk_size):
    hidden, weight, target = make_inputs()
    target[[0, 5, 13, 39]] = IGNORE
    assert_matches_reference(hidden, weight, target, chunk_size=chunk_size)


def test_matches_reference_without_ignored_targets_and_other_ignore_index():
    hidden, weight, target = make_inputs(seed=1)
    assert_matches_reference(hidden, weight, target, chunk_size=16)
    target[::3] = 7
    assert_matches_reference(hidden, weight, target, chunk_size=16, ignore_index=7)


def test_chunk_with_every_target_ignored():
    hidden, weight, target = make_inputs()
    target[8:16] = IGNORE
    _, grad_hidden, _ = assert_matches_reference(hidden, weight, target, chunk_size=8)
    assert torch.all(grad_hidden[8:16] == 0)


def test_every_target_ignored_gives_zero_loss_and_grads():
    hidden, weight, target = make_inputs()
    target[:] = IGNORE
    loss, grad_hidden, grad_weight = assert_matches_reference(hidden, weight, target, chunk_size=16)
    assert loss.item() == 0.0
    assert torch.all(grad_hidden == 0) and torch.all(grad_weight == 0)


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_frozen_input_gets_no_grad_and_the_other_is_right(frozen):
    hidden, weight, target = make_inputs()
    target[3] = IGNORE
    grad_flags = dict(hidden_grad=frozen != "hidden", weight_grad=frozen != "weight")
    loss, grad_hidden, grad_weight = assert_matches_reference(hidden, weight, target, chunk_size=16, **grad_flags)
    assert (grad_weight if frozen == "weight" else grad_hidden) is None
    assert (grad_hidden if frozen == "weight" else grad_weight) is not None


def test_backward_scales_by_grad_output():
    hidden, weight, target = make_inputs()
    target[2] = IGNORE
    _, half_hidden, half_weight = assert_matches_reference(hidden, weight, target, chunk_size=16, scale=0.5)
    _, full_hidden, full_weight = loss_and_grads(linear_cross_entropy, hidden, weight, target, chunk_size=16)
    torch.testing.assert_close(half_hidden, 0.5 * full_hidden)
    torch.testing.assert_close(half_weight, 0.5 * full_weight)


def test_bf16_inputs_are_close_to_the_fp32_reference():
    hidden, weight, target = make_inputs()
    target[4] = IGNORE
    loss, grad_hidden, grad_weight = loss_and_grads(
        linear_cross_entropy, hidden.bfloat16(), weight.bfloat16(), target, chunk_size=16
    )
    ref_loss, ref_hidden, ref_weight = loss_and_grads(reference, hidden, weight, target)
    assert loss.dtype == torch.float32
    assert grad_hidden.dtype == torch.bfloat16 and grad_weight.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad_hidden.float(), ref_hidden, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_weight.float(), ref_weight, rtol=2e-2, atol=2e-2)


def test_cpu_bf16_autocast_with_fp32_weight():
    hidden, weight, target = make_inputs()
    hidden = hidden.bfloat16()
    target[6] = IGNORE
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grad_hidden, grad_weight = loss_and_grads(linear_cross_entropy, hidden, weight, target, chunk_size=16)
        ref_loss, ref_hidden, ref_weight = loss_and_grads(reference, hidden, weight, target)
    assert loss.dtype == torch.float32
    assert grad_hidden.dtype == torch.bfloat16 and grad_weight.dtype == torch.float32
    assert ref_hidden.dtype == grad_hidden.dtype and ref_weight.dtype == grad_weight.dtype
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)  # same bf16 logits: only float rounding apart
    torch.testing.assert_close(grad_hidden, ref_hidden, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_weight, ref_weight, rtol=2e-2, atol=2e-2)


def test_no_grad_gives_the_loss_and_nothing_requiring_grad():
    hidden, weight, target = make_inputs()
    target[1] = IGNORE
    hidden.requires_grad_()
    weight.requires_grad_()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, target, chunk_size=16)
        ref_loss = reference(hidden, weight, target)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert not loss.requires_grad and loss.grad_fn is None


def test_chunk_size_must_be_positive():
    hidden, weight, target = make_inputs()
    with pytest.raises(ValueError):
        linear_cross_entropy(hidden, weight, target, chunk_size=0)
