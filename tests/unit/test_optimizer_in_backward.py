"""The optimizer step inside the backward (``optim/in_backward.py``) against the step after it, as fairseq's
Trainer drives both (criterion forward, backward, multiply_grads by 1 / sample size, clip_grad_norm for the
logged norm, step, LR schedule): the same weights, moments and gradient norm per update, gradients freed as
they are stepped; and what it cannot run refused in one place with what to change (``model_spec.py``)."""

import copy
import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from fairseq_ext.cube.model_spec import RunSettings, optimizer_in_backward_reasons
from fairseq_ext.cube.plan import Plan
from fairseq_ext.optim.in_backward import layer_step_groups
from fairseq_ext.optim.torch_adamw import FairseqTorchAdamW

UPDATES = 3
LR = 1e-2


class _Model(torch.nn.Module):
    """Embedding, two layers and an LM head tied to the embedding: a weight whose gradient comes twice."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(32, 16)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(2))
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, tokens):
        hidden = self.embed(tokens)
        for layer in self.layers:
            hidden = hidden + torch.tanh(layer(hidden))
        return self.norm(hidden) @ self.embed.weight.T


def _criterion(model, sample):
    """fairseq's criterion contract: summed loss, sample size, logging output."""
    logits = model(sample["tokens"])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), sample["target"].flatten(), reduction="sum")
    return loss, sample["ntokens"], {"loss": loss.detach()}


def _train_step(sample, model, criterion, optimizer, update_num, ignore_grad=False):
    """hf_finetune's train step: the criterion's forward, then the backward."""
    loss, sample_size, logging_output = criterion(model, sample)
    optimizer.backward(loss)
    return loss, sample_size, logging_output


def _samples():
    generator = torch.Generator().manual_seed(3)
    for ntokens in (40, 24, 33):
        tokens = torch.randint(0, 32, (1, ntokens), generator=generator)
        yield {"tokens": tokens, "target": torch.roll(tokens, -1, dims=1), "ntokens": ntokens}


def _train(model, precision: str, in_backward: bool, updates: int = UPDATES, by_layer: bool = True):
    """``updates`` updates as fairseq's Trainer runs them (inside the backward: a layer's weights stepped together,
    or each alone); returns the optimizer and each update's gradient norm."""
    cfg = OmegaConf.create(
        {"adam_betas": "(0.9, 0.95)", "adam_eps": 1e-8, "weight_decay": 0.1, "precision": precision, "lr": [LR]}
    )
    optimizer = FairseqTorchAdamW(cfg, [p for p in model.parameters() if p.requires_grad])
    groups = layer_step_groups(model.named_parameters()) if by_layer else ()
    hooks = optimizer.step_in_backward(groups) if in_backward else None
    train_step = hooks.arming(_train_step) if in_backward else _train_step
    norms = []
    for update, sample in zip(range(updates), _samples()):
        optimizer.set_lr(LR * (update + 1) / UPDATES)  # a warm-up schedule: the step reads the rate set before it
        optimizer.zero_grad()
        if hooks is not None:
            hooks.start_update()
        _, sample_size, _ = train_step(
            sample=sample, model=model, criterion=_criterion, optimizer=optimizer, update_num=update
        )
        if in_backward:
            assert all(p.grad is None for p in model.parameters())  # each freed once stepped
        optimizer.multiply_grads(1 / (float(sample_size) or 1.0))
        norms.append(optimizer.clip_grad_norm(0.0))
        optimizer.step()
    return optimizer, torch.stack(norms)


def _model(dtype):
    torch.manual_seed(0)
    return _Model().to(dtype)


@pytest.mark.parametrize(
    "precision, dtype, by_layer",
    [
        ("fp32", torch.float32, True),
        ("fp32", torch.float32, False),
        ("bf16-master", torch.bfloat16, True),
        ("bf16-lean", torch.bfloat16, True),
    ],
)
def test_in_backward_updates_equal_the_step_after_the_backward(precision, dtype, by_layer):
    """fp32 and bf16-master, over UPDATES updates of a warm-up: the same weights, masters and moments within
    float32 rounding (the CPU's fused AdamW in place of its multi-tensor one, which reads found_inf). bf16-lean,
    one update (later ones start from weights rounded apart): the same moments, weights within one bf16 step
    (its stochastic rounding draws other noise). The logged norm is the same."""
    updates = 1 if precision == "bf16-lean" else UPDATES
    after, inside = _model(dtype), _model(dtype)
    stepped_after, norms_after = _train(after, precision, False, updates)
    stepped_inside, norms_inside = _train(inside, precision, True, updates, by_layer)
    torch.testing.assert_close(norms_inside, norms_after, rtol=1e-6, atol=0)
    for (name, a), b in zip(after.named_parameters(), inside.parameters()):
        state_a, state_b = stepped_after.optimizer.state[a], stepped_inside.optimizer.state[b]
        assert torch.equal(state_a["step"], state_b["step"]) and state_a["step"].item() == updates
        if precision == "bf16-lean":
            ulp = a.detach().float().abs() * 2**-7  # bf16's spacing at the weight: at most 2**-7 of it
            assert ((a.detach().float() - b.detach().float()).abs() <= ulp).all(), name
            assert torch.equal(state_b["exp_avg"], state_a["exp_avg"]) and torch.equal(
                state_b["exp_avg_sq"], state_a["exp_avg_sq"]
            )
            continue
        for key in ("master", "exp_avg", "exp_avg_sq"):
            if key in state_a:
                torch.testing.assert_close(state_b[key], state_a[key], rtol=1e-6, atol=1e-7, msg=f"{name} {key}")
        torch.testing.assert_close(b, a, rtol=1e-6 if dtype == torch.float32 else 2**-8, atol=1e-7)


def test_a_layer_is_stepped_in_one_call_once_its_last_gradient_is_final():
    """The layers in the backward's order, each in one call, before the next layer's backward; the embedding
    (tied to the head) once both of its gradients arrived; a layer weight without a gradient in this backward
    leaves its layer to be stepped at the backward's end, itself not stepped."""
    model = _model(torch.float32)
    model.layers[0].unused = torch.nn.Parameter(torch.zeros(3))
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = FairseqTorchAdamW(
        OmegaConf.create({"adam_betas": "(0.9, 0.95)", "adam_eps": 1e-8, "weight_decay": 0.0, "lr": [LR]}),
        list(model.parameters()),
    )
    hooks = optimizer.step_in_backward(layer_step_groups(model.named_parameters()))
    calls, step_parameters = [], optimizer.optimizer.step_parameters

    def recording(group, params, *args, **kwargs):
        calls.append(sorted(names[id(p)] for p in params))
        return step_parameters(group, params, *args, **kwargs)

    optimizer.optimizer.step_parameters = recording
    hooks.start_update()
    hooks.arming(_train_step)(next(_samples()), model, _criterion, optimizer, 0)
    assert sorted(calls[:2]) == [["norm.bias"], ["norm.weight"]]  # not a layer: each alone
    assert calls[2:] == [
        ["layers.1.bias", "layers.1.weight"],
        ["embed.weight"],
        ["layers.0.bias", "layers.0.weight"],  # at the backward's end: its unused weight got no gradient
    ]
    assert model.layers[0].unused.grad is None and "step" not in optimizer.optimizer.state[model.layers[0].unused]


def test_a_nan_detector_rerun_steps_nothing():
    """A second backward of the same update (fairseq's NanDetector runs the batch again) keeps its gradients
    and changes no weight."""
    model = _model(torch.float32)
    optimizer, _ = _train(model, "fp32", in_backward=True)
    before = copy.deepcopy(model.state_dict())
    sample = next(_samples())
    _train_step(sample, model, _criterion, optimizer, 0)  # no start_update, not armed
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


ONE_GPU = Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1, optimizer_in_backward=True)


@pytest.mark.parametrize(
    "plan, settings, words",
    [
        (ONE_GPU, RunSettings(clip_norm=1.0), "set CLIP_NORM=0 (--clip-norm 0; run.sh's default is 1.0)"),
        (ONE_GPU, RunSettings(grad_accu=4), "GRADIENT_ACCU_NUM 4 add up gradients over several backwards"),
        (Plan(1, 1, 1, 1, num_microbatches=2, optimizer_in_backward=True), RunSettings(), "2 micro-batches"),
        (Plan(1, 2, 1, 1, optimizer_in_backward=True), RunSettings(), "this plan runs 2 process(es)"),
        (Plan(2, 1, 2, 1, optimizer_in_backward=True), RunSettings(), "use NPROC_PER_NODE=1 NNODES=1 PLAN_NGPUS=1"),
        (Plan(1, 1, 1, 1, zero=1, optimizer_in_backward=True), RunSettings(), "on FSDP2 (USE_ZERO=1)"),
        (ONE_GPU, RunSettings(precision="fp16"), "fairseq's --fp16"),
        (ONE_GPU, RunSettings(optimizer="adam"), "torch_adamw only, got --optimizer adam"),
    ],
)
def test_what_cannot_give_the_same_numbers_is_refused_with_what_to_change(plan, settings, words):
    reasons = optimizer_in_backward_reasons(plan, settings)
    assert len(reasons) == 1 and words in reasons[0] and "or OPTIMIZER_IN_BACKWARD=0" in reasons[0]


def test_allowed_where_the_numbers_are_the_same():
    for precision in ("fp32", "bf16", "bf16-master", "bf16-lean", "fp8-lean"):
        assert optimizer_in_backward_reasons(ONE_GPU, RunSettings(precision=precision, lora=True)) == []
    assert optimizer_in_backward_reasons(Plan(1, 1, 1, 1), RunSettings(clip_norm=1.0, grad_accu=8)) == []
    assert Plan.from_json(ONE_GPU.to_json()) == ONE_GPU and "optimizer_in_backward" not in Plan(1, 1, 1, 1).to_json()
    assert ONE_GPU.fingerprint() != Plan(1, 1, 1, 1).fingerprint()


def _toy_profile():
    """test_search's toy (two layers of 100 parameters, embedding and head of 50; fp32) with layers keeping
    10 bytes per token instead of 1000, so that the gradients, not the activations, decide the peak."""
    from fairseq_ext.cube.profile_types import Activations
    from tests.unit.test_search import toy_profile

    profile = toy_profile()
    layer = dataclasses.replace(profile.modules[1]["layers"], activations=Activations(per_token=10.0))
    return dataclasses.replace(profile, modules={1: dict(profile.modules[1], layers=layer)})


def test_the_search_steps_in_backward_where_nothing_fits_without_it():
    # 300 parameters, fp32: weights 4 + Adam 8 = 12 bytes each = 3600, gradients 4 bytes each = 1200. Batch 1 x
    # 10 tokens: activations 2 x 10 x 10 = 200. After the backward: 3600 + 1200 = 4800 (the step's peak).
    # Inside the backward no gradient is held: the head's backward holds its 200 (3600 + 200 + 200 = 4000), the
    # last layer's its 400 beside both layers' activations (3600 + 200 + 400 = 4200), then less: peak 4200.
    from fairseq_ext.cube.compile import Compiled, format_report
    from fairseq_ext.cube.cost import GIB, Hardware, Workload, estimate
    from fairseq_ext.cube.model_spec import ModelSpec
    from fairseq_ext.cube.search import Fixed, search

    profile, work = _toy_profile(), Workload(batch_size=1, seq_len=10)
    bare = Hardware(allocator_slack=0.0, workspace_bytes=0.0)
    after = estimate(profile, Plan(1, 1, 1, 1), work, bare)
    inside = estimate(profile, Plan(1, 1, 1, 1, optimizer_in_backward=True), work, bare)
    assert (after.peak_bytes, inside.peak_bytes) == (4800, 4200)
    assert inside.step_time == after.step_time
    spec = ModelSpec("toy", tp_rules={}, tp_sizes={}, num_layers=2, decoder=True, tied_embeddings=False, vocab_size=50)
    no_clip = RunSettings(clip_norm=0.0)
    chosen = search(profile, work, bare, 1, 1, 4500 / GIB, spec, no_clip)
    assert chosen.best.plan.optimizer_in_backward and chosen.best.cost.peak_bytes == 4200
    assert "in bwd" in format_report(Compiled(chosen.best.plan, chosen, 0.0))
    assert not search(profile, work, bare, 1, 1, 5000 / GIB, spec, no_clip).best.plan.optimizer_in_backward  # fits
    assert search(profile, work, bare, 1, 1, 4500 / GIB, spec, RunSettings(clip_norm=1.0)).best is None  # refused
    off = search(profile, work, bare, 1, 1, 4500 / GIB, spec, no_clip, fixed=Fixed(optimizer_in_backward=False))
    assert off.best is None


def test_compile_pass_fits_llama3_8b_bf16_lean_at_58gb_only_stepping_in_backward():
    """Llama-3-8B full finetuning in bf16-lean on one GPU, 2048 tokens: no plan fits 58 GB with the step after
    the backward (the smallest, recomputing its layers, needs 63: 15 GB of bf16 gradients held to the step);
    stepping inside the backward one does (about 53)."""
    from fairseq_ext.cube.compile import CompileSettings, compile_plan, format_report
    from tests.helpers import REPO

    settings = dict(
        model=str(REPO / "tests" / "assets" / "llama3-8b-config"),
        plan_ngpus=1,
        mem_per_gpu=58,
        batch_size=1,
        seq_len=2048,
        precision="bf16-lean",
    )
    compiled = compile_plan(CompileSettings(**settings, clip_norm=0.0))
    assert compiled.plan is not None and compiled.plan.optimizer_in_backward, compiled.error
    assert compiled.result.best.cost.peak_gib <= 58
    report = format_report(compiled)
    assert "optimizer step in backward" in report and '"optimizer_in_backward": true' in report
    assert min(c.cost.peak_gib for c in compiled.result.candidates if not c.plan.optimizer_in_backward) > 58
