"""bf16-master under FSDP2: gradients summed in float32, the master step on each rank's local shards.

1. FSDP2 sums the bf16 gradients of bf16-master in float32 (``precision.reduce_dtype``), on 4 gloo processes.
A bf16 weight whose gradient on rank r is that rank's input x_r (bf16). Summed in float32, every element of the
reduced gradient is the exact mean of the four x_r rounded to bf16 once: four bf16 values of these magnitudes
add exactly in float32, and dividing by 4 is exact, so equality is exact. Summed in bf16 (bf16-lean's reduce
dtype), partial sums are rounded on the way and a large share of the elements differ: checked too, so that the
test tells the two apart.

2. The optimizer steps FSDP2's local shards (``LocalShards``): plain bf16 tensors sharing the sharded weights'
storage, with bf16 gradients, all contiguous (what the one-launch master kernel takes: it steps them on GPUs,
tests/gpu/test_master_step.py, with :func:`sharded_tiny_llama` and :func:`train_updates`); on the CPU, two
updates of the shipped tiny Llama sharded over one rank equal the plain model's, weight for weight.
"""

import copy
import json
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM

from fairseq_ext.cube.plan import Plan
from fairseq_ext.cube.runtime.fsdp import OneRankReduceScatter, shard_data_parallel
from fairseq_ext.cube.runtime.local_shards import LocalShards, local_tensor
from fairseq_ext.cube.runtime.mesh import build_mesh, data_parallel_mesh, init_one_process_group
from fairseq_ext.cube.runtime.precision import reduce_dtype
from fairseq_ext.optim.adamw import MixedPrecisionAdamW
from tests.helpers import MODEL_DIR, _run_then_exit

RANKS = 4
ELEMENTS = 4096


class _Scaled(torch.nn.Module):
    """``(weight * x).sum()``: the weight's gradient is the input itself."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(ELEMENTS, dtype=torch.bfloat16))

    def forward(self, x):
        return (self.weight * x).sum()


def _inputs():
    """Each rank's input: bf16 values of random sign and magnitudes spread over 2**-6..2**6."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(RANKS, ELEMENTS, generator=generator) * 2.0 ** torch.randint(
        -6, 7, (RANKS, ELEMENTS), generator=generator
    )
    return values.bfloat16()


def _reduced_gradient(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS)
    try:
        mesh = init_device_mesh("cpu", (RANKS,))
        plan = Plan(plan_ngpus=1, scaling_factor=RANKS, tp=1, pp=1, zero=2)
        results = {}
        for name, dtype in (
            ("float32", reduce_dtype("bf16-master", RANKS)),
            ("bf16", reduce_dtype("bf16-lean", RANKS)),
        ):
            model = _Scaled()
            shard_data_parallel([model], model, plan, mesh, dtype)
            model(_inputs()[rank]).backward()
            grad = model.weight.grad.full_tensor()
            results[name] = grad.float().tolist() if rank == 0 else None
            assert grad.dtype == torch.bfloat16
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(f"{out_dir}/grads.json", "w") as f:
            json.dump(results, f)


def test_bf16_master_sums_bf16_gradients_in_float32_and_rounds_once(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # forked, not spawned: the ranks start with this process's imports (fairseq_ext takes 20 s to import)
    mp.start_processes(_run_then_exit, args=(_reduced_gradient, port, str(tmp_path)), nprocs=RANKS, start_method="fork")
    grads = {name: torch.tensor(values) for name, values in json.loads((tmp_path / "grads.json").read_text()).items()}
    exact_mean = _inputs().double().mean(0).bfloat16().float()  # FSDP2 averages over the replicas
    assert reduce_dtype("bf16-master", RANKS) == torch.float32 and reduce_dtype("bf16-lean", RANKS) is None
    assert torch.equal(grads["float32"], exact_mean)
    assert (grads["bf16"] != exact_mean).float().mean().item() > 0.05  # rounded partial sums: the test can tell


def sharded_tiny_llama(device: torch.device, zero: int = 3):
    """(plain, sharded): the shipped tiny Llama in bf16 on ``device`` and a copy sharded by FSDP2 over a mesh of
    one rank at ``zero``, as one GPU at USE_ZERO runs it under bf16-master (a one-rank group is made if none)."""
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(MODEL_DIR)).to(device, torch.bfloat16)
    sharded = copy.deepcopy(plain)
    init_one_process_group(device.type)
    plan = Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1, zero=zero)
    shard_data_parallel(
        [sharded], sharded, plan, data_parallel_mesh(build_mesh(plan, device.type)), reduce_dtype("bf16-master", 1)
    )
    return plain, sharded


def train_updates(model: torch.nn.Module, updates: int = 2):
    """``updates`` AdamW steps (bf16-master: float32 masters) of ``model`` on fixed random batches, the way the
    trainer steps a model on a mesh: the optimizer holds local shards, gradients linked after the backward.
    Returns (optimizer, the views it steps)."""
    device = next(model.parameters()).device
    shards = LocalShards([p for p in model.parameters() if p.requires_grad])
    optimizer = MixedPrecisionAdamW(shards.views, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(1)
    for _ in range(updates):
        ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=generator).to(device)
        model(input_ids=ids, labels=ids).loss.backward()
        shards.link_grads()
        optimizer.step(grad_scale=0.5)
        for param in model.parameters():
            param.grad = None
        for view in shards.views:
            view.grad = None
    return optimizer, shards.views


def test_master_step_runs_on_local_shards_and_trains_as_the_plain_model():
    device = torch.device("cpu")
    try:
        plain, sharded = sharded_tiny_llama(device)
        params = list(sharded.parameters())
        assert all(isinstance(p, DTensor) for p in params)
        shards = LocalShards(params)
        sharded(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
        shards.link_grads()
        for param, view in zip(params, shards.views):
            assert not isinstance(view, DTensor) and view.dtype == view.grad.dtype == torch.bfloat16
            assert view.is_contiguous() and view.grad.is_contiguous()
            assert view.data_ptr() == local_tensor(param).data_ptr()  # the step writes the model's own shard
        for param in params:
            param.grad = None
        initial = plain.lm_head.weight.detach().clone()
        train_updates(sharded)
        train_updates(plain)
        full = {name: p.full_tensor() for name, p in sharded.named_parameters()}
        for name, value in plain.named_parameters():
            assert torch.equal(full[name], value.detach()), name
        assert not torch.equal(full["lm_head.weight"], initial)  # the updates really moved the weights
    finally:
        dist.destroy_process_group()


def reductions_hand_over_in_place(device: torch.device, monkeypatch, exact: bool = True) -> None:
    """Over a mesh of one rank on ``device`` every FSDP2 reduction gets its input's buffer as its output (FSDP2's
    copy from one to the other then copies a tensor onto itself, which torch skips), and the gradients of two
    accumulated batches are the plain model's (``exact``: bit for bit)."""
    handed_over = []
    allocate = OneRankReduceScatter.allocate

    def recording(self, size, **kwargs):
        pending = self._input
        buffer = allocate(self, size, **kwargs)
        if pending is not None:
            handed_over.append(buffer is pending)
        return buffer

    monkeypatch.setattr(OneRankReduceScatter, "allocate", recording)
    try:
        plain, sharded = sharded_tiny_llama(device, zero=2)
        batches = [torch.tensor([[5, 6, 7, 8]], device=device), torch.tensor([[9, 3, 4]], device=device)]
        for model in (plain, sharded):
            for ids in batches:  # the second batch's gradients accumulate into the first's shards
                model(input_ids=ids, labels=ids).loss.backward()
        grads = {name: local_tensor(p.grad) for name, p in sharded.named_parameters()}
        for name, param in plain.named_parameters():
            if exact:
                assert torch.equal(grads[name], param.grad), name
            else:
                torch.testing.assert_close(grads[name], param.grad, rtol=1e-2, atol=1e-5, msg=name)
    finally:
        dist.destroy_process_group()
    assert len(handed_over) == 6 and all(handed_over)  # two decoder layers and the root, two batches


def test_one_rank_reductions_hand_the_gradients_over_in_place(monkeypatch):
    reductions_hand_over_in_place(torch.device("cpu"), monkeypatch)


def test_the_lm_loss_computes_the_head_chunk_by_chunk_under_fsdp2(monkeypatch):
    """FSDP2 over one rank at each level: the causal-LM loss still applies the LM head chunk by chunk (no
    (B, T, vocab) logits: the model is never asked for them), reading the whole weight the forward gathered;
    loss and every gradient equal the plain model's."""
    from fairseq_ext.criterions.lm_loss import CausalLMLoss
    from fairseq_ext.models.hf_auto import HFAutoCausalLM

    init_one_process_group("cpu")
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(MODEL_DIR))
    ids = torch.randint(3, hf_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    sample = {"net_input": {"input_ids": ids}, "target": ids.roll(-1, dims=1), "ntokens": ids.numel(), "nsentences": 2}
    criterion = CausalLMLoss(None)

    def loss_and_grads(model):
        loss, _, _ = criterion(model, sample)
        loss.backward()
        return loss.detach(), {n: local_tensor(p.grad) for n, p in model.named_parameters()}

    plain = HFAutoCausalLM(copy.deepcopy(hf_model))
    expected_loss, expected_grads = loss_and_grads(plain)
    for zero in (1, 3):
        sharded = HFAutoCausalLM(copy.deepcopy(hf_model))
        plan = Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1, zero=zero)
        shard_data_parallel([sharded], sharded.hf_model, plan, data_parallel_mesh(build_mesh(plan, "cpu")))
        assert isinstance(sharded.fused_lm_head(), DTensor)
        forward = sharded.forward

        def hidden_states_only(*args, features_only=False, **kwargs):
            assert features_only, "full logits were computed"
            return forward(*args, features_only=features_only, **kwargs)

        monkeypatch.setattr(sharded, "forward", hidden_states_only)
        loss, grads = loss_and_grads(sharded)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
        for name, grad in expected_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"ZeRO {zero}: {name}")
