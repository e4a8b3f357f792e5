"""The profile and cost model against the real tiny Llama: parameter, gradient and optimizer bytes equal
the real tensors (whole and as the runtime's tp shards), predicted peak memory tracks torch's MemTracker
on a real CPU training step, and FLOPs match FlopCounterMode.

Tolerances: without recompute 1%: the layers' saved tensors are the same ones, counted on fake tensors,
and the fused loss's chunk-sized temporaries are counted from its code (0.9% short here). With recompute 5%: the backward walk measures the rise of one layer's backward on a
two-layer copy and assumes every layer behaves like it, which misses a few hidden-size gradients that
non-reentrant checkpointing keeps between layers (3% on the tiny model, where they weigh most)."""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM

from fairseq_ext.cube.cost import ADAM_STATE_BYTES, Hardware, Workload, estimate
from fairseq_ext.cube.plan import Plan
from fairseq_ext.cube.profile import fused_head_activations, load_config, profile_model
from fairseq_ext.cube.runtime.chunked_loss import chunk_rows, linear_cross_entropy
from fairseq_ext.cube.runtime.recompute import apply_recompute
from tests.helpers import MODEL_DIR

BATCH, SEQ = 4, 64
BARE = Hardware(allocator_slack=0.0, workspace_bytes=0.0)


@pytest.fixture(scope="module")
def profile():
    return profile_model(load_config(str(MODEL_DIR)), SEQ, "fp32", (1, 2))


def real_model(attn="sdpa"):
    config = AutoConfig.from_pretrained(MODEL_DIR)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def groups(model):
    """Parameter elements of embed / layers (one layer) / norm / head, from the real model."""
    base = model.base_model
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {
        "embed": count(base.embed_tokens),
        "layers": count(base.layers[0]),
        "norm": count(base.norm),
        "head": count(model.get_output_embeddings()),
    }


def test_parameter_gradient_and_optimizer_bytes_equal_the_real_tensors(profile):
    model = real_model()
    for name, numel in groups(model).items():
        assert profile.module(1, name).param_numel == numel, name
    assert profile.param_numel == sum(p.numel() for p in model.parameters())
    # one real Adam step: weights, gradients and both moments of every parameter
    optimizer = torch.optim.Adam(model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    states = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if v.dim() > 0)
    assert (weights, grads, states) == (
        profile.param_numel * 4,
        profile.param_numel * 4,
        profile.param_numel * ADAM_STATE_BYTES,
    )
    plan = Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1)
    assert estimate(profile, plan, Workload(BATCH, SEQ), BARE).parts["static"] == weights + grads + states


def test_tp2_shards_equal_the_runtimes_local_tensors(profile):
    """Rank 0 of a fake 2-process group shards the real model with the runtime's parallelize(); its local
    tensors are what the profile says one of tp=2 ranks holds (the vocabulary too: vocab parallel)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from fairseq_ext.cube.runtime.local_shards import local_tensor
    from fairseq_ext.cube.runtime.parallelize import parallelize

    model = real_model()
    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    try:
        plan = Plan(plan_ngpus=2, scaling_factor=1, tp=2, pp=1)
        parallelize(model, plan, init_device_mesh("cpu", (1, 1, 2), mesh_dim_names=("dp", "pp", "tp")))
        base = model.base_model
        local = lambda m: sum(local_tensor(p).numel() for p in m.parameters())  # noqa: E731
        got = {
            "embed": local(base.embed_tokens),
            "layers": local(base.layers[0]),
            "norm": local(base.norm),
            "head": local(model.get_output_embeddings()),
        }
    finally:
        dist.destroy_process_group()
    assert profile.vocab_parallel[2]
    assert got == {name: profile.module(2, name).local_numel(2) for name in got}


@pytest.mark.parametrize("recompute", [None, "LlamaDecoderLayer"])
def test_predicted_peak_tracks_a_real_training_step(profile, recompute):
    """MemTracker follows every tensor of a real CPU step (forward, the criterion's loss, backward, Adam)."""
    model = real_model()
    if recompute:
        apply_recompute(model, [recompute])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ))

    head = model.get_output_embeddings().weight

    def step():  # the causal-LM criterion's fused loss: the LM head applied chunk by chunk inside it
        hidden = model.base_model(input_ids=ids).last_hidden_state
        loss = linear_cross_entropy(
            hidden.reshape(-1, hidden.size(-1)), head, ids.view(-1), chunk_size=chunk_rows(head.size(0))
        )
        del hidden
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # as fairseq does

    step()  # creates Adam's states
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    measured = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    plan = Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1, recompute_modules=(recompute,) if recompute else ())
    eager_loss = {1: fused_head_activations(model.config, "fp32", compiled_softmax=False)}  # as on this CPU
    predicted = estimate(replace(profile, fused_head=eager_loss), plan, Workload(BATCH, SEQ), BARE).peak_bytes
    tolerance = 0.01 if recompute is None else 0.05
    assert abs(predicted - measured) <= tolerance * measured, (predicted, measured, (predicted - measured) / measured)


def test_forward_flops_match_flop_counter(profile):
    """Eager attention's matmuls are counted by FlopCounterMode; the profile (SDPA) adds them analytically."""
    model = real_model("eager")
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids)
    predicted = (
        sum(
            profile.module(1, name).fwd_flops_per_token * (profile.num_layers if name == "layers" else 1)
            for name in ("embed", "layers", "norm", "head")
        )
        * BATCH
        * SEQ
    )
    assert predicted == pytest.approx(counter.get_total_flops(), rel=1e-9)
