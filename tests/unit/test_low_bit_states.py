"""OPTIMIZER_STATES=8bit / 4bit without torchao (CI does not install it): the bytes the compile pass and the
runtime count, the plan the compile pass chooses for Llama-3-8B with them, the settings refused with what to
change, stale plans, and the one-line error where torchao is missing. The update itself: tests/gpu/test_low_bit_states.py.
"""

import builtins

import pytest
import torch

from fairseq_ext.cube.compile import CompileSettings, check_plan_is_current, compile_plan
from fairseq_ext.cube.cost import optimizer_step_bytes, precision_bytes
from fairseq_ext.cube.model_spec import RunSettings, optimizer_states_reasons
from fairseq_ext.cube.plan import Plan
from fairseq_ext.cube.profile import load_config
from fairseq_ext.errors import UserInputError
from fairseq_ext.optim.low_bit import STEP_SLOWDOWN, check_states, state_bytes, step_bytes
from tests.helpers import REPO

LLAMA3_8B = str(REPO / "tests" / "assets" / "llama3-8b-config")
ONE_GPU = Plan(1, 1, 1, 1)


def test_bytes_per_parameter_of_the_states_and_their_step():
    """A byte per moment element and a float32 scale per 256 (8bit) / half a byte and one per 128 (4bit),
    in place of bf16-lean's two bf16 moments; the step moves the scaled gradient and torchao's reads and writes."""
    assert state_bytes("8bit") == 2 * (1 + 4 / 256)
    assert state_bytes("4bit") == 2 * (0.5 + 4 / 128)
    assert precision_bytes("bf16-lean") == (2, 2, 4)
    assert precision_bytes("bf16-lean", "8bit") == (2, 2, state_bytes("8bit"))
    assert precision_bytes("fp8-lean", "4bit") == (2, 2, state_bytes("4bit"))
    assert precision_bytes("fp32", "8bit") == (4, 4, state_bytes("8bit"))
    assert step_bytes("8bit", 2, 2) == 2 * 2 + STEP_SLOWDOWN * (
        (2 + 2 + state_bytes("8bit")) + (2 + state_bytes("8bit"))
    )
    assert optimizer_step_bytes("bf16-lean", "8bit") == step_bytes("8bit", 2, 2)
    assert optimizer_step_bytes("bf16-lean") == 14  # the precision's own step, unchanged
    with pytest.raises(UserInputError, match="unknown OPTIMIZER_STATES '2bit'.*precision, 8bit, 4bit"):
        check_states("2bit")


@pytest.mark.parametrize(
    "plan, settings, words",
    [
        (ONE_GPU, RunSettings(precision="bf16-master", optimizer_states="8bit"), "keeps float32 master weights"),
        (ONE_GPU, RunSettings(precision="fp8", optimizer_states="4bit"), "use PRECISION=bf16-lean"),
        (ONE_GPU, RunSettings(precision="fp16", optimizer_states="8bit"), "fairseq's fp16 optimizer"),
        (Plan(1, 2, 1, 1), RunSettings(precision="bf16-lean", optimizer_states="8bit"), "runs in one process"),
        (Plan(2, 1, 2, 1), RunSettings(precision="bf16-lean", optimizer_states="8bit"), "PLAN_NGPUS=1 USE_ZERO=0"),
        (Plan(1, 1, 1, 1, zero=1), RunSettings(precision="bf16-lean", optimizer_states="8bit"), "one process"),
        (
            Plan(1, 1, 1, 1, optimizer_in_backward=True),
            RunSettings(precision="bf16-lean", optimizer_states="8bit"),
            "use OPTIMIZER_IN_BACKWARD=0",
        ),
        (ONE_GPU, RunSettings(precision="bf16-lean", optimizer_states="8bit", optimizer="adam"), "torch_adamw"),
    ],
)
def test_what_cannot_run_is_refused_with_what_to_change(plan, settings, words):
    reasons = optimizer_states_reasons(plan, settings)
    assert len(reasons) == 1 and words in reasons[0], reasons
    assert "OPTIMIZER_STATES=precision" in reasons[0] or "torch_adamw" in reasons[0]


def test_allowed_in_one_process_over_weights_kept_as_they_are():
    for precision in ("bf16-lean", "fp8-lean", "fp32", "bf16"):
        for states in ("8bit", "4bit"):
            assert optimizer_states_reasons(ONE_GPU, RunSettings(precision=precision, optimizer_states=states)) == []
    assert optimizer_states_reasons(Plan(2, 1, 2, 1), RunSettings(precision="bf16-master")) == []


def test_compile_pass_plans_llama3_8b_with_8bit_states():
    """Llama-3-8B bf16-lean, 2 x 2048 tokens, GRADIENT_ACCU_NUM=8, 74 GB: with bf16 moments the gradients that
    live through the forward leave no room but for recomputed MLPs; 8-bit moments free 2 bytes a parameter
    (~15 GB), and the plan keeps every activation, faster by the recompute it drops."""
    settings = dict(
        model=LLAMA3_8B,
        plan_ngpus=1,
        mem_per_gpu=74,
        batch_size=2,
        seq_len=2048,
        grad_accu=8,
        precision="bf16-lean",
        compiled=True,
    )
    lean = compile_plan(CompileSettings(**settings))
    low_bit = compile_plan(CompileSettings(**settings, optimizer_states="8bit"))
    assert lean.plan.recompute_modules and not low_bit.plan.recompute_modules
    assert low_bit.result.best.cost.step_time < 0.9 * lean.result.best.cost.step_time
    assert low_bit.result.best.cost.peak_gib <= 74
    static = {name: c.result.best.cost.parts["static"] for name, c in (("lean", lean), ("8bit", low_bit))}
    saved = 8.03e9 * (4 - state_bytes("8bit"))  # Llama-3-8B's parameters x the bytes per parameter saved
    assert static["lean"] - static["8bit"] == pytest.approx(saved, rel=0.01)
    # a plan compiled for 8-bit states is stale for a run without them, and the other way round
    config = load_config(LLAMA3_8B)
    current = dict(seq_len=2048, batch_size=2, grad_accu=8, precision="bf16-lean", compiled=True)
    check_plan_is_current(low_bit.plan, config, optimizer_states="8bit", **current)
    with pytest.raises(UserInputError, match="OPTIMIZER_STATES"):
        check_plan_is_current(low_bit.plan, config, **current)
    with pytest.raises(UserInputError, match="compiled for another model or other settings"):
        check_plan_is_current(lean.plan, config, optimizer_states="8bit", **current)
    # one micro-batch at 56 GB: bf16 moments need the step inside the backward (and recomputed MLPs), 8-bit ones
    # neither; where 8-bit plans are over the budget, the search offers no step inside the backward (refused)
    tight = dict(settings, grad_accu=1, batch_size=1, clip_norm=0.0)
    lean = compile_plan(CompileSettings(**dict(tight, mem_per_gpu=56)))
    assert lean.plan.optimizer_in_backward and lean.plan.recompute_modules
    low_bit = compile_plan(CompileSettings(**dict(tight, mem_per_gpu=56), optimizer_states="8bit"))
    assert not low_bit.plan.optimizer_in_backward and not low_bit.plan.recompute_modules
    squeezed = compile_plan(CompileSettings(**dict(tight, mem_per_gpu=44), optimizer_states="8bit"))
    assert not any(c.plan.optimizer_in_backward for c in squeezed.result.candidates)


def test_without_torchao_the_optimizer_says_what_to_install(monkeypatch):
    """On a machine without torchao (CI's), choosing low-bit states fails in one line naming the package."""
    from omegaconf import OmegaConf

    from fairseq_ext.optim.torch_adamw import FairseqTorchAdamW

    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name == "torchao" or name.startswith("torchao.") or name.endswith("torchao_adamw"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    cfg = OmegaConf.create(
        {
            "adam_betas": "(0.9, 0.95)",
            "adam_eps": 1e-8,
            "weight_decay": 0.0,
            "precision": "bf16-lean",
            "optimizer_states": "8bit",
            "lr": [1e-3],
        }
    )
    params = [torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))]
    with pytest.raises(UserInputError, match=r"OPTIMIZER_STATES=8bit runs torchao's low-bit AdamW; install it \("):
        FairseqTorchAdamW(cfg, params)


def test_bf16_lean_resumes_from_a_low_bit_checkpoint():
    """A checkpoint of the low-bit optimizer holds float32 moments and torchao's group settings (no lean_states):
    bf16-lean's optimizer resumes from it with bf16 moments and steps."""
    from fairseq_ext.optim.adamw import MixedPrecisionAdamW

    weight = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    saved = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(64), "exp_avg_sq": torch.rand(64)}},
        "param_groups": [
            dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, amsgrad=False, params=[0]),
        ],
    }
    optimizer = MixedPrecisionAdamW([weight], lr=1e-3, lean_states=True)
    optimizer.load_state_dict(saved)
    weight.grad = torch.randn(64, dtype=torch.bfloat16)
    before = weight.detach().clone()
    optimizer.step()
    state = optimizer.state[weight]
    assert state["exp_avg"].dtype == torch.bfloat16 and "master" not in state and state["step"].item() == 4
    assert not torch.equal(weight.detach(), before)
