"""Fused LM head + cross-entropy that never holds the full (tokens x vocabulary) logits.

For the causal-LM loss on one GPU, 16k tokens a batch over a vocabulary of 32k-128k make fp32 logits
of 2-8 GB, and autograd keeps them (and their softmax) until the backward. ``linear_cross_entropy``
walks the tokens in chunks: it computes a chunk's logits, its loss and, right away, its gradients
for ``hidden`` and ``weight``, then drops the logits. Only those two gradients are kept for the
backward, so the extra memory peaks at O(chunk_size x vocabulary).

Hand-written because it wins where it matters: against Liger Kernel's fused linear cross-entropy in the same
H100 run (benchmarks/results/lm_loss_speed, run 29) it is as fast or faster than Liger as it ships (1.6-2.4x at
the 8B shapes) and never waits for the device, which every Liger call does twice; with the head gradient summed
in the matmul's float32 accumulator it matches plain PyTorch's time at the 8B full shape with half the memory
(run 31).
"""

import contextlib

import torch

CHUNK_ELEMENTS = 1 << 27  # logits computed at once: 512 MB in float32


def chunk_rows(vocab: int) -> int:
    """Rows of one chunk for a vocabulary of ``vocab``: ``CHUNK_ELEMENTS`` logits, at least 512 rows."""
    return max(512, CHUNK_ELEMENTS // vocab)


def _loss_and_grad_logits(logits, target, ignore_index: int, want_grad: bool):
    """Summed float32 cross entropy of one chunk's logits and, if ``want_grad``, its gradient with respect
    to the logits (softmax minus one-hot, zero on ignored rows) in the logits' dtype.

    Written as one expression so that ``torch.compile`` (on GPUs) fuses it into a reduction and one
    elementwise pass over the chunk, instead of a float32 buffer rewritten op by op.
    """
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0)
    scores = logits.float()
    log_sum_exp = torch.logsumexp(scores, dim=1)
    target_logit = scores.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    loss = torch.where(valid, log_sum_exp - target_logit, 0.0).sum()
    if not want_grad:
        return loss, None
    one_hot = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0) == safe_target.unsqueeze(1)
    grad = torch.exp(scores - log_sum_exp.unsqueeze(1)) - one_hot.float()
    return loss, torch.where(valid.unsqueeze(1), grad, 0.0).to(logits.dtype)


_compiled_loss_and_grad_logits = None


def _loss_and_grad_function(device: torch.device):
    """The compiled :func:`_loss_and_grad_logits` on GPUs (compiled once per process), else the eager one."""
    global _compiled_loss_and_grad_logits
    if device.type != "cuda":
        return _loss_and_grad_logits
    if _compiled_loss_and_grad_logits is None:
        _compiled_loss_and_grad_logits = torch.compile(_loss_and_grad_logits)
    return _compiled_loss_and_grad_logits


def _chunk_loss(h, w, target, ignore_index, grad_hidden, grad_weight):
    """Summed loss of one chunk of rows; writes its gradient into ``grad_hidden`` and adds it to ``grad_weight``.

    ``h`` and ``w`` are in the matmul dtype; either gradient may be None (not wanted).
    """
    want_grad = grad_hidden is not None or grad_weight is not None
    loss, grad_logits = _loss_and_grad_function(h.device)(h @ w.T, target, ignore_index, want_grad)
    if grad_hidden is not None:
        grad_hidden.copy_(grad_logits @ w)
    if grad_weight is not None:
        if grad_weight.dtype == h.dtype:
            grad_weight.addmm_(grad_logits.T, h)
        elif grad_weight.is_cuda:  # the float32 sum added in the matmul itself (cuBLAS: bf16 inputs, float32 C)
            torch.addmm(grad_weight, grad_logits.T, h, out_dtype=grad_weight.dtype, out=grad_weight)
        else:  # the CPU's addmm takes one dtype: add the lower-precision product to the float32 sum
            grad_weight += grad_logits.T @ h
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T``; the gradients are computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, target, ignore_index, chunk_size, dtype, grad_enabled):
        # The forward always runs without grad mode; ``grad_enabled`` is the caller's (False in validation).
        grad_hidden = torch.empty_like(hidden) if grad_enabled and ctx.needs_input_grad[0] else None
        grad_weight = None
        if grad_enabled and ctx.needs_input_grad[1]:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        w = weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            loss += _chunk_loss(
                hidden[rows].to(dtype),
                w,
                target[rows],
                ignore_index,
                None if grad_hidden is None else grad_hidden[rows],
                grad_weight,
            )

        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output
        if grad_weight is not None:
            grad_weight = grad_weight * grad_output
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, chunk_size: int = 4096
) -> torch.Tensor:
    """Sum over positions with target != ignore_index of cross_entropy(hidden @ weight.T, target), in float32.

    ``hidden`` is (N, H) (flatten (B, T, H) first), ``weight`` the (V, H) LM head weight (no bias),
    ``target`` (N,) int64. Returns a 0-dim float32 tensor equal, to float rounding, to
    ``F.cross_entropy((hidden @ weight.T).float(), target, ignore_index=ignore_index, reduction="sum")``
    without materializing the (N, V) logits: rows go ``chunk_size`` at a time, and the gradients are
    computed in the forward (only for inputs that require grad, and none under ``torch.no_grad``).
    The matmuls run in the inputs' dtype, or in the autocast dtype when autocast is on for
    ``hidden``'s device; softmax and loss are float32; gradients come back in each input's dtype.
    Backpropagate the loss once.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    device_type = hidden.device.type
    autocasting = torch.is_autocast_enabled(device_type)
    if autocasting:
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    # The Function casts to ``dtype`` itself; autocast inside it would also cast its float32 arithmetic.
    no_autocast = torch.autocast(device_type, enabled=False) if autocasting else contextlib.nullcontext()
    with no_autocast:
        return _LinearCrossEntropy.apply(
            hidden, weight, target, ignore_index, chunk_size, dtype, torch.is_grad_enabled()
        )
