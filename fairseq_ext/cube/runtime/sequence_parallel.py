"""Sequence parallel (SEQUENCE_PARALLEL=1): between the tensor-parallel regions each rank holds 1/tp of the tokens.

Without it the norms and the residual stream of a tensor-parallel Llama-style decoder are whole on every
rank: each rank normalises every token and keeps the norms' activations for all of them. With it (torch's
``SequenceParallel`` and ``PrepareModuleInput``, laid out as torchtitan does for its Llama), the hidden
states between the attention and MLP blocks are sharded on the sequence dim (``Shard(1)``):

- the first decoder layer cuts its input to this rank's tokens (the embeddings stay whole on every rank:
  Hugging Face's decoder derives the positions, the rotary embeddings and the causal mask from their
  length; their gradient is gathered back whole);
- each norm of a decoder layer runs on this rank's tokens (its weight replicated; its gradient summed over tp);
- the attention and the MLP all-gather their input (the colwise projections need every token) and their
  rowwise output projections reduce-scatter onto the sequence shards instead of all-reducing: the same bytes
  on the wire as one all-reduce;
- the final norm runs on this rank's tokens and all-gathers its output, so the LM head and the loss see the
  whole sequence as without sequence parallel.

tp must divide the batch's length: the trainer pads causal LM batches (``cube/batch_padding.py``).
"""

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    PrepareModuleInput,
    PrepareModuleOutput,
    SequenceParallel,
    parallelize_module,
)

SEQUENCE = Shard(1)  # (batch, sequence, hidden)
ATTENTION, MLP = "self_attn", "mlp"  # a Llama-style decoder layer's blocks


def is_layer_norm(name: str) -> bool:
    """Whether a decoder layer's child ``name`` is one of its norms (input_layernorm, post_attention_layernorm,
    Gemma's pre_/post_feedforward_layernorm): they run between the tensor-parallel regions."""
    return "norm" in name.lower()


def apply_sequence_parallel(hf_model: nn.Module, tp_mesh: DeviceMesh) -> int:
    """Shard ``hf_model``'s decoder stack on the sequence between its tensor-parallel regions; return how many
    norms run on sequence shards. Call after ``apply_tensor_parallel(..., sequence_parallel=True)`` (its
    rowwise projections leave their output on sequence shards)."""
    base = hf_model.base_model
    norms = 0
    for layer in base.layers:
        plan = {name: SequenceParallel() for name, _ in layer.named_children() if is_layer_norm(name)}
        norms += len(plan)
        plan[ATTENTION] = PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": SEQUENCE},
            desired_input_kwarg_layouts={"hidden_states": Replicate()},
            use_local_output=True,
        )
        plan[MLP] = PrepareModuleInput(
            input_layouts=(SEQUENCE,), desired_input_layouts=(Replicate(),), use_local_output=True
        )
        parallelize_module(layer, tp_mesh, plan)
    parallelize_module(
        base.layers[0],
        tp_mesh,
        PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(SEQUENCE,), use_local_output=True),
    )
    parallelize_module(base.norm, tp_mesh, SequenceParallel())
    parallelize_module(
        base.norm,
        tp_mesh,
        PrepareModuleOutput(output_layouts=SEQUENCE, desired_output_layouts=Replicate(), use_local_output=True),
    )
    return norms + 1
