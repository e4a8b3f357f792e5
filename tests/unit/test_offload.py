"""Activation offloading (runtime/offload.py) on the CPU: the hooks move what a layer saves and give back the
same losses and gradients (eager, LoRA, a compiled layer), parameters and small tensors stay, the wrapper
leaves state dict keys alone; the plan's rule against recomputing and offloading one class, the refusal
off CUDA and under tensor parallel; the cost model's offloaded bytes and the search's choice between
offloading and recompute."""

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fairseq_ext.cube.compile import _describe
from fairseq_ext.cube.cost import GIB, Workload, estimate
from fairseq_ext.cube.model_spec import RunSettings
from fairseq_ext.cube.plan import Plan
from fairseq_ext.cube.plan_checks import with_offload
from fairseq_ext.cube.runtime.offload import HostOffload, apply_offload, offloaded_modules
from fairseq_ext.cube.search import Fixed, search
from fairseq_ext.errors import UserInputError
from tests.helpers import RUN_SH, run
from tests.unit.test_compile_layers import lora_llama
from tests.unit.test_search import BARE, TOY_SPEC, toy_profile

LAYER = "LlamaDecoderLayer"


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config), torch.randint(0, 128, (2, 64))


def loss_and_grads(model, tokens):
    loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    loss.backward()
    grads = {
        n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters() if p.grad is not None
    }
    return loss.detach(), grads


def offloaded_run(model, tokens, compile_backend=None):
    """Loss, gradients and each wrapper's byte counts of ``model`` with its decoder layers offloaded (every
    saved tensor that is no parameter: min_bytes 1; not pinned: no CUDA here)."""
    assert apply_offload(model, [LAYER], pin_memory=False, min_bytes=1) == 2
    if compile_backend:
        for wrapper in offloaded_modules(model):
            wrapper._checkpoint_wrapped_module.compile(backend=compile_backend)
    loss, grads = loss_and_grads(model, tokens)
    return loss, grads, [w.last_stats for w in offloaded_modules(model)]


def assert_same(expected, actual):
    assert torch.equal(expected[0], actual[0])
    assert expected[1].keys() == actual[1].keys()
    for name, grad in expected[1].items():
        assert torch.equal(grad, actual[1][name]), name


def test_offloading_gives_the_same_losses_and_gradients(tiny_llama):
    base, tokens = tiny_llama
    expected = loss_and_grads(copy.deepcopy(base), tokens)
    loss, grads, stats = offloaded_run(copy.deepcopy(base), tokens)
    assert_same(expected, (loss, grads))
    parameter_bytes = sum(p.numel() * 4 for p in base.model.layers[0].parameters())
    for layer in stats:
        assert layer["offloaded"] > 4 * parameter_bytes  # the activations of 128 tokens, not the weights
        assert layer["kept"] == parameter_bytes  # every weight saved for backward stays where it is


def test_lora_layers_offload_with_the_same_gradients(tiny_llama):
    base, tokens = tiny_llama
    expected = loss_and_grads(lora_llama(base), tokens)
    loss, grads, stats = offloaded_run(lora_llama(base), tokens)
    assert_same(expected, (loss, grads))
    assert all(s["offloaded"] > 0 for s in stats) and any("lora_A" in name for name in grads)


def test_a_compiled_layer_offloads_what_its_partitioner_saved(tiny_llama):
    # AOTAutograd runs plain-function hooks at run time on the compiled graph's saved tensors: fewer of them
    # than eager keeps, the same results; no graph breaks
    base, tokens = tiny_llama
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    expected = loss_and_grads(copy.deepcopy(base), tokens)
    _, _, eager_stats = offloaded_run(copy.deepcopy(base), tokens)
    loss, grads, stats = offloaded_run(copy.deepcopy(base), tokens, compile_backend="aot_eager")
    assert_same(expected, (loss, grads))
    assert 0 < stats[0]["tensors"] < eager_stats[0]["tensors"]
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph for both layers


def test_parameters_and_small_tensors_stay_on_their_device():
    weight = torch.nn.Parameter(torch.randn(256, 256))
    x = torch.randn(8, 256, requires_grad=True)
    small = torch.randn(4, requires_grad=True)

    def forward():
        # saves x (8 KiB), a view of the weight (256 KiB), the relu's 8 KiB output, and two 16-byte tensors
        return (x @ weight.t()).relu().sum() + (small * small.exp()).sum()

    expected = torch.autograd.grad(forward(), (x, weight, small))
    hooks = HostOffload({weight.untyped_storage().data_ptr()}, pin_memory=False, min_bytes=4096)
    with hooks:
        loss = forward()
    actual = torch.autograd.grad(loss, (x, weight, small))
    assert all(torch.equal(a, b) for a, b in zip(expected, actual))
    assert hooks.stats["offloaded"] == 2 * 8 * 256 * 4 and hooks.stats["tensors"] == 2
    assert hooks.stats["kept"] >= 256 * 256 * 4 + 2 * 16


def test_a_tensor_saved_twice_is_copied_once():
    x = torch.randn(64, 64, requires_grad=True)
    hooks = HostOffload(set(), pin_memory=False, min_bytes=1)
    with hooks:
        y = x.sin()
        loss = (y * y).sum()  # mul saves y as both of its inputs
    assert hooks.stats == {"offloaded": 2 * 64 * 64 * 4, "kept": 0, "tensors": 2}  # x (by sin) and y, once
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * x.sin() * x.cos())


def test_wrapping_keeps_the_state_dict_keys(tiny_llama):
    base, _ = tiny_llama
    model = copy.deepcopy(base)
    apply_offload(model, [LAYER], pin_memory=False)
    assert list(model.state_dict()) == list(base.state_dict())
    with pytest.raises(UserInputError, match="LlamaDecoderLayr: no module of the model has that class"):
        apply_offload(copy.deepcopy(base), ["LlamaDecoderLayr"])


def run_cfg(cpu=True, recompute=""):
    return SimpleNamespace(
        task=SimpleNamespace(offload_activations=True),
        model=SimpleNamespace(recompute_module_names=recompute),
        common=SimpleNamespace(cpu=cpu),
    )


def test_offloading_is_refused_where_it_cannot_run(tiny_llama, monkeypatch):
    base, _ = tiny_llama
    plan = Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert with_offload(run_cfg(cpu=False), base, plan).offload_modules == (LAYER,)  # the model's decoder layers
    with pytest.raises(UserInputError, match="this run trains on the CPU.*set OFFLOAD_ACTIVATIONS=0"):
        with_offload(run_cfg(cpu=True), base, plan)
    # a layer recomputed (the model's flag or the plan) keeps only its inputs: one or the other
    with pytest.raises(UserInputError, match=f"{LAYER} is both recomputed and offloaded"):
        with_offload(run_cfg(cpu=False, recompute=LAYER), base, plan)
    with pytest.raises(UserInputError, match="both recomputed and offloaded"):
        Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1, recompute_modules=("A",), offload_modules=("A",)).validate()
    # plans that do not offload keep their JSON (and fingerprint); those that do round-trip
    assert "offload_modules" not in plan.to_json()
    offloading = Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1, offload_modules=(LAYER,))
    assert Plan.from_json(offloading.to_json()) == offloading
    from fairseq_ext.cube.model_spec import ModelSpec

    spec = ModelSpec(
        model_type="llama", tp_rules={}, tp_sizes={}, num_layers=2, decoder=True, tied_embeddings=False, vocab_size=128
    )
    tp_plan = Plan(plan_ngpus=2, scaling_factor=1, tp=2, pp=1, offload_modules=(LAYER,))
    assert any("activation offloading" in r and "PLAN_NGPUS=1" in r for r in spec.unsupported(tp_plan, RunSettings()))


def test_the_cost_model_moves_an_offloaded_layers_activations_to_the_host():
    # toy_profile: layers keep 1000 bytes a token; 10 tokens. Offloaded, the device keeps none of the 2 x 10000:
    # after the head's gradients 3600 + 200 = 3800; the last layer's backward holds its 10000 again (13800),
    # leaves its gradients (4200); the first holds its 10000: 14200, what recompute reaches by rebuilding them.
    profile, work = toy_profile(), Workload(batch_size=1, seq_len=10)
    offloading = Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1, offload_modules=("Block",))
    plain = estimate(profile, Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1), work, BARE)
    cost = estimate(profile, offloading, work, BARE)
    assert cost.peak_bytes == 14200 and plain.peak_bytes == 23800
    assert cost.parts["offload_bytes"] == 20000 and cost.parts["activations"] == 0
    assert cost.parts["offload"] == pytest.approx(2 * 20000 / BARE.host_bandwidth)
    assert cost.parts["compute_and_tp"] - plain.parts["compute_and_tp"] == pytest.approx(cost.parts["offload"])


def test_the_search_weighs_offloading_against_recompute():
    profile, work = toy_profile(), Workload(batch_size=1, seq_len=10)
    budget = 20000 / GIB  # neither the plain plan (23800) nor anything else but recompute or offloading fits
    slow_link = search(profile, work, BARE, 1, 1, budget, TOY_SPEC)
    labels = {c.recompute: c for c in slow_link.candidates}
    assert "offload Block" in labels and not labels["offload Block"].rejected
    assert slow_link.best.plan.recompute_modules == ("Block",)  # its FLOPs cost less than 20 KB over PCIe
    fast_link = search(
        profile, work, BARE.__class__(**{**BARE.__dict__, "host_bandwidth": 1e30}), 1, 1, budget, TOY_SPEC
    )
    assert fast_link.best.plan.offload_modules == ("Block",) and fast_link.best.plan.recompute_modules == ()
    assert "offload Block (activations in host memory)" in _describe(fast_link.best)
    # a plan that fits is not offloaded unless the user asks (OFFLOAD_ACTIVATIONS=1): then every plan is
    roomy = search(profile, work, BARE, 1, 1, 30000 / GIB, TOY_SPEC)
    assert all(not c.plan.offload_modules for c in roomy.candidates)
    asked = search(profile, work, BARE, 1, 1, 30000 / GIB, TOY_SPEC, fixed=Fixed(offload=True))
    assert all(c.plan.offload_modules == ("Block",) for c in asked.candidates)


def test_run_sh_on_the_cpu_refuses_offloading_in_one_line(tmp_path):
    result = run(
        ["bash", RUN_SH],
        timeout=300,
        extra_env={"OUTPUT_DIR": str(tmp_path), "OFFLOAD_ACTIVATIONS": "1", "MAX_STEPS": "1", "EVALUATE": "0"},
    )
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() and "DEBUG" not in line]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert errors == [
        "fairseq_ext: error: OFFLOAD_ACTIVATIONS=1 moves activations from GPU memory to pinned host memory; this run "
        "trains on the CPU, where they already are in host memory: set OFFLOAD_ACTIVATIONS=0"
    ]
