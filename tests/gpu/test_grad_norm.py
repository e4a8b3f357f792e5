"""On a GPU: the gradient norm of a model on a mesh (``LocalShards.grad_norm``, what clipping reads on every tensor-,
pipeline- or FSDP2-parallel run) is computed on the device without the host waiting for it, and equals the norm
of the plain model's gradients; over a mesh of one rank, FSDP2's reductions hand their input over as their output.

Runs on the GPU machine (``python -m pytest -q tests/gpu``).
"""

import pytest
import torch
import torch.distributed as dist

from fairseq_ext.cube.runtime.local_shards import LocalShards

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_grad_norm_on_fsdp2_shards_never_waits_for_the_device():
    from tests.distributed.test_fsdp_bf16_master import sharded_tiny_llama

    try:
        plain, sharded = sharded_tiny_llama(torch.device("cuda"))
        ids = torch.randint(3, plain.config.vocab_size, (2, 16), device="cuda")
        for model in (plain, sharded):
            model(input_ids=ids, labels=ids).loss.backward()
        shards = LocalShards(list(sharded.parameters()))
        shards.grad_norm()  # the first call builds what it needs
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            norm = shards.grad_norm()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert norm.is_cuda and norm.dtype == torch.float32
        expected = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in plain.parameters()]))
        assert norm.item() == pytest.approx(expected.item(), rel=1e-5)
    finally:
        dist.destroy_process_group()


def test_one_rank_reductions_hand_the_gradients_over_in_place_on_the_gpu(monkeypatch):
    """The output request comes from FSDP2's reduce-scatter stream, so on a GPU it is told from the next input."""
    from tests.distributed.test_fsdp_bf16_master import reductions_hand_over_in_place

    reductions_hand_over_in_place(torch.device("cuda"), monkeypatch, exact=False)
