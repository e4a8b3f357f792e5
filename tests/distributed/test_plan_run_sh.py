"""Tensor-parallel plans through run.sh (torchrun, gloo, CPU) give the single-process training.

Each run trains the shipped tiny Llama (4 heads, 2 kv heads, FFN 384, vocabulary 594) for 10 updates
and is compared with one process on the same data order and global batch: the loss of every update
(relative 1e-5; read from ``exact_loss``, logged at full precision by the tests' --user-dir, as fairseq rounds
``loss`` to 3 decimals); the gradient
norm (to the last of its 3 logged decimals), tokens and samples of every update (the norm catches a
wrongly scaled gradient, which Adam and clipping hide from the loss; the counts catch sums over the
ranks of a scale unit); and every parameter of the saved checkpoint, read in one process (a
tensor-parallel run writes sharded checkpoints by default: each rank's shards, read back into full
tensors here).

Weights: tensor parallel sums partial products in another order, so gradients differ by float32
rounding; Adam divides by sqrt(v), and where a gradient is near zero (the embedding row of a token
seen once) that rounding moves a weight by a visible fraction of the learning rate (3e-3). So all but
0.01% of the elements must match to 1e-5, and none may differ by more than 1e-4; a real bug (a wrong
shard, a missed reduction) moves most elements of a tensor.
"""

import json
import re
import shutil
from multiprocessing.pool import ThreadPool

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fairseq_ext.cube.checkpoint import export_hf, load_trained
from fairseq_ext.cube.sharded_checkpoint import read_checkpoint
from fairseq_ext.models.hf_loading import load_hf_model
from tests.helpers import EXACT_LOSS_USER_DIR, MODEL_DIR, minilm_folder
from tests.integration.test_run_sh import free_port, run_sh

STEPS = 10
COMMON = dict(
    MAX_STEPS=STEPS,
    SAVE_STEPS=STEPS,
    WARMUP_STEPS=2,
    BATCH_SIZE=4,
    SEQUENCE_LENGTH=64,
    EVALUATE=0,
    LOG_FORMAT="json",
    LOG_INTERVAL=1,
    USER_DIR=EXACT_LOSS_USER_DIR,
)


def train(folder, args=(), **variables):
    result = run_sh(folder, args=args, **{**COMMON, **variables})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    log = result.stdout + (folder / "out" / "log" / "train.log").read_text()
    weights = read_checkpoint(str(folder / "out" / "checkpoint" / "checkpoint_last.pt"), optimizer=False)
    return full_precision_losses(result.stdout), counted(result.stdout), weights["model"], log


def inner_records(stdout):
    for line in stdout.splitlines():
        if "| train_inner |" in line:
            record = json.loads(line.split("| train_inner |", 1)[1])
            yield int(record["num_updates"]), record


def counted(stdout):
    """Per update: the gradient norm, and the tokens and samples of the global batch (summed over scale
    units only, never over the ranks of a unit)."""
    return {step: (record["gnorm"], record["wpb"], record["bsz"]) for step, record in inner_records(stdout)}


def full_precision_losses(stdout):
    """The loss fairseq logs rounded to 3 decimals, at full precision: ``exact_loss`` (tests/assets/exact_loss,
    the --user-dir of these runs)."""
    return {step: float(record["exact_loss"]) for step, record in inner_records(stdout)}


def assert_weights_match(got, expected, name):
    assert got.shape == expected.shape, name  # full tensors, not shards
    close = torch.isclose(got, expected, rtol=1e-5, atol=1e-5)
    assert (~close).sum().item() <= max(2, expected.numel() // 10000), (name, (~close).sum().item())
    assert (got - expected).abs().max().item() <= 1e-4, (name, (got - expected).abs().max().item())


def assert_same_training(got, expected, min_progress=0.5, loss_atol=0.0):
    (got_losses, got_counts, got_weights, _), (expected_losses, expected_counts, expected_weights, _) = got, expected
    assert sorted(got_losses) == sorted(expected_losses) == list(range(1, STEPS + 1))
    for step, loss in expected_losses.items():
        assert abs(got_losses[step] - loss) <= max(1e-5 * abs(loss), loss_atol), (step, got_losses[step], loss)
    assert sorted(got_counts) == sorted(expected_counts)
    for step, (norm, tokens, samples) in expected_counts.items():
        got_norm, got_tokens, got_samples = got_counts[step]
        # fairseq logs the norm rounded to 3 decimals: float rounding may flip the last one, a wrong scale does more
        assert abs(float(got_norm) - float(norm)) <= 1.5e-3, (step, got_counts[step], expected_counts[step])
        assert (got_tokens, got_samples) == (tokens, samples), (step, got_counts[step], expected_counts[step])
    assert expected_losses[STEPS] < expected_losses[1] - min_progress, expected_losses  # the steps really train
    assert got_weights.keys() == expected_weights.keys()
    for name, value in expected_weights.items():
        assert_weights_match(got_weights[name], value, name)


def chained(results):
    """One training from the results of runs that each resumed the one before: every run's losses and
    counts, the last run's weights and log."""
    return (
        {k: v for r in results for k, v in r[0].items()},
        {k: v for r in results for k, v in r[1].items()},
        results[-1][2],
        results[-1][3],
    )


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The single-process reference runs, each trained once per module: accumulation 1, 2 and 4."""
    cache = {}

    def reference(accumulation):
        if accumulation not in cache:
            folder = tmp_path_factory.mktemp(f"one_accu{accumulation}")
            cache[accumulation] = train(folder, NPROC_PER_NODE=1, GRADIENT_ACCU_NUM=accumulation)
        return cache[accumulation]

    return reference


def test_tp2_matches_one_process(tmp_path, one_process):
    tp2 = train(tmp_path, NPROC_PER_NODE=2, PLAN_NGPUS=2)
    log = tp2[3]
    assert '"tp": 2' in log and '"scaling_factor": 1' in log, "the plan is printed in the log"
    assert "embeddings and LM head vocab parallel" in log
    assert_same_training(tp2, one_process(1))


def test_tp2_with_gradient_accumulation_matches_one_process(tmp_path, one_process):
    assert_same_training(train(tmp_path, NPROC_PER_NODE=2, PLAN_NGPUS=2, GRADIENT_ACCU_NUM=4), one_process(4))


def test_two_tp2_scale_units_with_zero3_match_one_process(tmp_path, one_process):
    """4 processes: 2 scale units of tp 2, ZeRO 3 (FSDP2 across the units: each tensor-parallel shard split
    again over them, weights freed after each layer's forward). Unit u reads batches u, u+2, ... (fairseq
    shards by unit), so one update sees two consecutive batches: exactly one process with GRADIENT_ACCU_NUM=2."""
    run = train(tmp_path, NPROC_PER_NODE=4, PLAN_NGPUS=2, USE_ZERO=3)
    assert '"scaling_factor": 2' in run[3] and '"zero": 3' in run[3]
    assert "data parallel (FSDP2, ZeRO 3): 2 blocks and 1 root(s) over 2 scale units, sharding 1 x 2" in run[3]
    assert_same_training(run, one_process(2))


def test_one_process_on_fsdp2_matches_the_plain_process_and_resumes_across_levels(tmp_path, one_process):
    """One process alone on FSDP2 (USE_ZERO >= 1 on one GPU: a mesh of one rank), accumulation 2: USE_ZERO=3 for
    updates 1-5, resumed by USE_ZERO=1 for updates 6-10 from the sharded checkpoint the first wrote, against the
    plain process (USE_ZERO=0, no FSDP2): the same losses, gradient norms, tokens, samples and final weights."""
    plain = one_process(2)
    assert "FSDP2" not in plain[3]
    runs = [
        train(tmp_path, NPROC_PER_NODE=1, GRADIENT_ACCU_NUM=2, USE_ZERO=3, args=["--max-update", "5"]),
        train(tmp_path, NPROC_PER_NODE=1, GRADIENT_ACCU_NUM=2, USE_ZERO=1),
    ]
    for run, level in zip(runs, (3, 1)):
        line = f"data parallel (FSDP2, ZeRO {level}): 2 blocks and 1 root(s) over 1 scale units, sharding 1 x 1"
        assert line in run[3], run[3][-3000:]
    assert checkpoint_format(tmp_path) == "dcp"
    assert [sorted(r[0]) for r in runs] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert_same_training(chained(runs), plain)


BAD_PLANS = {
    "world size not PLAN_NGPUS x CUBE_SCALING_FACTOR": (
        dict(NPROC_PER_NODE=2, PLAN_NGPUS=2, CUBE_SCALING_FACTOR=2),
        r"PLAN_NGPUS 2 x CUBE_SCALING_FACTOR 2 = 4 does not equal the world size 2",
    ),
    "PLAN_NGPUS does not divide the world size": (
        dict(NPROC_PER_NODE=3, PLAN_NGPUS=2),
        r"run\.sh: error: PLAN_NGPUS 2 does not divide the world size 3",
    ),
    "tp does not divide the heads": (
        dict(NPROC_PER_NODE=3, PLAN_NGPUS=3),
        r"tp 3 does not divide num_attention_heads 4",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PLANS))
def test_bad_plan_gets_one_clear_error(tmp_path, case):
    variables, message = BAD_PLANS[case]
    result = run_sh(tmp_path, **{**COMMON, **variables})
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    assert len([line for line in result.stderr.splitlines() if "error:" in line]) == 1, result.stderr


def checkpoint_format(folder):
    """``dcp`` when the run's checkpoint_last.pt is a sharded checkpoint's small file, else ``full``."""
    raw = torch.load(folder / "out" / "checkpoint" / "checkpoint_last.pt", weights_only=False)
    return "dcp" if "dcp" in raw and "model" not in raw else "full"


def test_checkpoints_resume_across_plans_and_formats(tmp_path, one_process):
    """One checkpoint folder, four runs, each loading what the one before saved: one process (full
    checkpoint) for updates 1-3; tp 2 for 4-6 (loads the full tensors into its shards, writes a sharded
    checkpoint); one process with CHECKPOINT_FORMAT=dcp for 7-8 (reads the shards into full tensors,
    writes a sharded checkpoint of its own); tp 2 with CHECKPOINT_FORMAT=full for 9-10 (dcp.load reshards
    the one-process checkpoint; full tensors gathered for the save). The same losses, gradient norms and
    final weights as one process that never stopped (model and Adam states survive every change)."""
    runs = [
        dict(NPROC_PER_NODE=1, args=["--max-update", "3"]),
        dict(NPROC_PER_NODE=2, PLAN_NGPUS=2, args=["--max-update", "6"]),
        dict(NPROC_PER_NODE=1, CHECKPOINT_FORMAT="dcp", args=["--max-update", "8"]),
        dict(NPROC_PER_NODE=2, PLAN_NGPUS=2, CHECKPOINT_FORMAT="full"),
    ]
    results, formats = [], []
    for variables in runs:
        results.append(train(tmp_path, **variables))
        formats.append(checkpoint_format(tmp_path))
    assert formats == ["full", "dcp", "dcp", "full"]
    assert [sorted(r[0]) for r in results] == [[1, 2, 3], [4, 5, 6], [7, 8], [9, 10]]
    resumed = chained(results)
    assert_same_training(resumed, one_process(1))


def test_two_nodes_simulated_match_one_process(tmp_path, one_process):
    """Two run.sh launches on this machine (NNODES=2, NODE_RANK 0 and 1, 2 processes each): a scale unit of
    tp 2 per node, ZeRO 1 with the default ZERO_N_GROUPS (= NNODES: shards stay inside a node, here one unit
    per node, so each node keeps whole states and the nodes only all-reduce gradients). The nodes
    share CHECKPOINT_DIR, as sharded checkpoints need: every rank writes its shards there."""
    port = free_port()
    checkpoint_dir = tmp_path / "shared_checkpoint"
    nodes = dict(NNODES=2, NPROC_PER_NODE=2, PLAN_NGPUS=2, USE_ZERO=1, MASTER_PORT=port, CHECKPOINT_DIR=checkpoint_dir)
    with ThreadPool(1) as pool:
        node1 = pool.apply_async(run_sh, (tmp_path / "node1",), {**COMMON, **nodes, "NODE_RANK": 1})
        node0 = run_sh(tmp_path / "node0", **{**COMMON, **nodes, "NODE_RANK": 0})
        node1 = node1.get(timeout=900)
    for result in (node0, node1):
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert (
        "data parallel (FSDP2, ZeRO 1): 2 blocks and 1 root(s) over 2 scale units, sharding 2 x 1"
        in node0.stdout + (tmp_path / "node0" / "out" / "log" / "train.log").read_text()
    )
    weights = read_checkpoint(str(checkpoint_dir / "checkpoint_last.pt"), optimizer=False)
    run = (full_precision_losses(node0.stdout), counted(node0.stdout), weights["model"], "")
    assert_same_training(run, one_process(2))


@pytest.fixture(scope="module")
def minilm_without_dropout(tmp_path_factory):
    """The pretrained MiniLM (BERT) with dropout off, so that a tensor-parallel run can match one process."""
    folder = tmp_path_factory.mktemp("minilm") / "minilm"
    shutil.copytree(minilm_folder(), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def test_tp2_bert_sequence_classification_matches_one_process(tmp_path, minilm_without_dropout):
    """A BERT-style encoder has no base_model_tp_plan: the runtime's own rules shard its attention (12 heads,
    6 per rank) and FFN; the classification head stays replicated. Same losses, norms and weights."""
    settings = dict(
        MODEL_ARCH="hf_auto_seq_cls_lm",
        HUGGINGFACE_MODEL_NAME_OR_PATH=str(minilm_without_dropout),
        LEARNING_RATE="2e-4",
    )
    tp2 = train(tmp_path / "tp2", NPROC_PER_NODE=2, PLAN_NGPUS=2, **settings)
    assert "tensor parallel: 36 modules sharded over tp 2" in tp2[3]
    one = train(tmp_path / "one", NPROC_PER_NODE=1, **settings)
    assert_same_training(tp2, one, min_progress=0.0, loss_atol=1.5e-3)  # classification logs 3 decimals only


def test_tp2_t5_seq2seq_matches_one_process(tmp_path):
    """T5 (the shipped tiny T5, encoder-decoder, tied embeddings) has no base_model_tp_plan either: the
    runtime's rules shard self- and cross-attention, the relative position bias by heads, and the FFN."""
    settings = dict(MODEL_ARCH="hf_auto_seq2seq_lm")
    tp2 = train(tmp_path / "tp2", NPROC_PER_NODE=2, PLAN_NGPUS=2, **settings)
    assert "tensor parallel: 34 modules sharded over tp 2" in tp2[3]
    assert_same_training(tp2, train(tmp_path / "one", NPROC_PER_NODE=1, **settings))


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A tiny GPT-2 (Conv1D projections, q/k/v fused in c_attn, tied embeddings) on the shipped tokenizer,
    dropout off, so that a tensor-parallel run can match one process."""
    folder = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODEL_DIR / name, folder / name)
    config = dict(
        model_type="gpt2",
        vocab_size=json.loads((MODEL_DIR / "config.json").read_text())["vocab_size"],
        n_embd=64,
        n_head=4,
        n_layer=2,
        n_positions=512,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def test_tp2_gpt2_causal_lm_matches_one_process(tmp_path, tiny_gpt2):
    """GPT-2 has no base_model_tp_plan and Conv1D projections: the runtime's rules give each rank its heads of
    the fused q/k/v and half the FFN; the tied embeddings stay replicated (vocab parallel off)."""
    settings = dict(HUGGINGFACE_MODEL_NAME_OR_PATH=str(tiny_gpt2))
    tp2 = train(tmp_path / "tp2", NPROC_PER_NODE=2, PLAN_NGPUS=2, **settings)
    assert "tensor parallel: 8 modules sharded over tp 2" in tp2[3] and "vocab parallel off" in tp2[3]
    one = train(tmp_path / "one", NPROC_PER_NODE=1, **settings)
    weights = tp2[2]
    assert weights["hf_model.transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # full, [q | k | v]
    assert torch.equal(weights["hf_model.lm_head.weight"], weights["hf_model.transformer.wte.weight"])  # still tied
    assert_same_training(tp2, one)


def test_tp2_with_packed_sequences_matches_one_process(tmp_path):
    """PACK_SEQUENCES=1 under tensor parallel: each rank's heads see the same block-diagonal mask (built from
    the restarted position ids), so the packed training is the single process's packed training."""
    reference = train(tmp_path / "one", NPROC_PER_NODE=1, PACK_SEQUENCES=1)
    assert "packed" in reference[3]
    assert_same_training(train(tmp_path / "tp2", NPROC_PER_NODE=2, PLAN_NGPUS=2, PACK_SEQUENCES=1), reference)


def test_tp2_padding_free_matches_one_process(tmp_path, one_process):
    """PADDING_FREE=1 under tensor parallel: each batch one row of its samples' tokens, no pad, every rank's
    heads attending inside the samples (document attention from the restarted position ids): the losses,
    gradient norms, counts and weights of the padded single-process training."""
    tp2 = train(tmp_path / "tp2", NPROC_PER_NODE=2, PLAN_NGPUS=2, PADDING_FREE=1)
    assert '"tp": 2' in tp2[3] and "'padding_free': True" in tp2[3], tp2[3][-3000:]
    assert_same_training(tp2, one_process(1))


LORA = dict(
    USE_LORA=1,
    LEARNING_RATE="1e-2",
    LORA_CONFIG="r=4 lora_alpha=8 lora_dropout=0.0 target_modules=q_proj,k_proj,v_proj,o_proj,gate_proj,"
    "up_proj,down_proj",
)


def test_tp2_lora_matches_one_process(tmp_path):
    """LoRA under tensor parallel: q/k/v/gate/up split with their B matrices, o/down with their A matrices;
    the adapters train as in one process and the checkpoint holds them whole."""
    reference = train(tmp_path / "one", NPROC_PER_NODE=1, **LORA)
    tp2 = train(tmp_path / "tp2", NPROC_PER_NODE=2, PLAN_NGPUS=2, **LORA)
    assert reference[2].keys() == tp2[2].keys() and all("lora_" in key for key in tp2[2])
    assert tp2[2]["hf_model.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"].shape == (
        128,
        4,
    )  # whole
    assert_same_training(tp2, reference, min_progress=0.1)
    # the tensor-parallel (sharded) checkpoint exports as a PEFT adapter that reproduces the trained model
    checkpoint = str(tmp_path / "tp2" / "out" / "checkpoint" / "checkpoint_last.pt")
    cfg, _, model = load_trained(checkpoint)
    export_hf(checkpoint, str(tmp_path / "adapter"))
    base = load_hf_model(AutoModelForCausalLM, str(MODEL_DIR), init_seed=cfg.task.seed)
    adapter = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    input_ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        torch.testing.assert_close(adapter(input_ids=input_ids).logits, model(input_ids))


def test_tp2_with_compiled_blocks_matches_one_process(tmp_path, one_process):
    """COMPILE=1 under tensor parallel: each decoder block is compiled (inductor, on the CPU too) after it is
    sharded, so the compiled graph holds its shards and collectives; the training is the eager process's."""
    tp2 = train(tmp_path, NPROC_PER_NODE=2, PLAN_NGPUS=2, COMPILE=1)
    assert "torch.compile: 2 decoder layers" in tp2[3]
    assert_same_training(tp2, one_process(1))


def test_two_scale_units_at_zero3_with_compiled_blocks_match_one_process(tmp_path, one_process):
    """COMPILE=1 with data parallel on FSDP2: each decoder block is compiled before it is sharded over the
    scale units (ZeRO 3: its weights gathered for the forward and again for the backward); the training is the
    eager process's with the same global batch."""
    run = train(tmp_path, NPROC_PER_NODE=2, USE_ZERO=3, COMPILE=1)
    assert "torch.compile: 2 decoder layers" in run[3] and "data parallel (FSDP2, ZeRO 3)" in run[3]
    assert_same_training(run, one_process(2))


def test_tp2_bf16_master_matches_one_process_in_bf16_master(tmp_path):
    """PRECISION=bf16-master under tensor parallel against one process in bf16-master: the float32 master step
    runs on each rank's local shards, element by element the same arithmetic as one process's.

    1e-5 is out of reach in bfloat16: a rowwise projection's output is two partial sums, each rounded to bf16's
    8 significant bits, then added and rounded again, where one process rounds the whole sum once; so the forward
    differs by about 2**-8 relative in a few outputs of each layer, and the loss of an update by about 1e-4
    relative (2.2e-4 at most over these 10 updates). Held: the loss to 1e-3 relative, the gradient norm to 5e-3
    relative, the same tokens and samples, and the weights to a mean difference of 2e-4 per tensor (a wrong shard
    or a missed step moves them by about the learning rate, 3e-3, per update)."""
    settings = dict(PRECISION="bf16-master")
    one = train(tmp_path / "one", NPROC_PER_NODE=1, **settings)
    tp2 = train(tmp_path / "tp2", NPROC_PER_NODE=2, PLAN_NGPUS=2, **settings)
    (losses, counts, weights, log), (expected_losses, expected_counts, expected_weights, _) = tp2, one
    assert '"tp": 2' in log and "embeddings and LM head vocab parallel" in log
    assert sorted(losses) == sorted(expected_losses) == list(range(1, STEPS + 1))
    for step, loss in expected_losses.items():
        assert abs(losses[step] - loss) <= 1e-3 * abs(loss), (step, losses[step], loss)
        (norm, tokens, samples), (expected_norm, *expected_sizes) = counts[step], expected_counts[step]
        assert abs(float(norm) - float(expected_norm)) <= 5e-3 * float(expected_norm), (step, norm, expected_norm)
        assert [tokens, samples] == expected_sizes, (step, counts[step], expected_counts[step])
    assert expected_losses[STEPS] < expected_losses[1] - 0.5, expected_losses
    assert weights.keys() == expected_weights.keys()
    for name, value in expected_weights.items():
        assert weights[name].shape == value.shape and torch.equal(value, value.bfloat16().float()), name
        assert (weights[name] - value).abs().mean().item() <= 2e-4, (name, (weights[name] - value).abs().mean())
    optimizer = read_checkpoint(str(tmp_path / "tp2" / "out" / "checkpoint" / "checkpoint_last.pt"))
    masters = [state["master"] for state in optimizer["last_optimizer_state"]["state"].values()]
    assert len(masters) == len(weights) and any(not torch.equal(m, m.bfloat16().float()) for m in masters)


def test_tp2_with_sequence_parallel_matches_one_process(tmp_path, one_process):
    """SEQUENCE_PARALLEL=1: each rank normalises half the tokens (the 2 norms of each layer and the final one),
    the attention and MLP gather them and their output projections scatter them back; batches are padded to an
    even length. The training is the single process's."""
    tp2 = train(tmp_path, NPROC_PER_NODE=2, PLAN_NGPUS=2, SEQUENCE_PARALLEL=1)
    assert "sequence parallel: 5 norms and the hidden states between them sharded over tp 2" in tp2[3]
    assert_same_training(tp2, one_process(1))
