"""Two measurements of a decoder layer on fake tensors (shapes and dtypes, no data), for ``profile.py``:
the bytes per token it saves for backward as AOTAutograd partitions it (eager, or as torch.compile's
min-cut partitioner does), and its backward's working set under torch's ``MemTracker``."""

import copy
import functools
from dataclasses import replace
from typing import Optional, Tuple

import torch

from .profile_types import WEIGHT_DTYPES


def with_layer_bytes(layer: dict, layer_class: str, per_token: float) -> dict:
    """A decoder layer's profile with the bytes per token it keeps set to ``per_token`` (what AOTAutograd's
    partition saves); partial recompute (a sub-module's class) keeps the same share less than that."""
    eager = layer["activations"]
    scale = per_token / eager.per_token if eager.per_token else 1.0
    recompute = {
        cls: (kept if cls == layer_class else replace(kept, per_token=kept.per_token * scale), flops)
        for cls, (kept, flops) in layer["recompute"].items()
    }
    return dict(layer, activations=replace(eager, per_token=per_token), recompute=recompute)


def layer_bytes_per_token(config, seq_len: int, precision: str, attn_implementation: str, compiled: bool) -> float:
    """Bytes per token one decoder layer saves for backward: the layer traced on fake tensors by AOTAutograd
    and split into forward and backward as eager autograd does, or, ``compiled``, by the min-cut partitioner
    Inductor uses (it recomputes cheap elementwise results instead of saving them); the forward graph's saved
    outputs (distinct storages) at batch 2 less batch 1."""
    from torch._functorch.aot_autograd import aot_function, make_boxed_func
    from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config.num_hidden_layers = 1
    config._attn_implementation = attn_implementation
    dtype = WEIGHT_DTYPES.get(precision, torch.float32)
    saved = []

    def keep_saved(graph_module, _inputs):
        outputs = next(n for n in graph_module.graph.nodes if n.op == "output").args[0]
        storages = {}
        for node in outputs[1:]:  # the first is the layer's output, the rest what backward needs
            value = getattr(node, "meta", {}).get("val")
            if isinstance(value, torch.Tensor):
                storages[value.untyped_storage()._cdata] = value.untyped_storage().nbytes()
        saved.append(sum(storages.values()))
        return make_boxed_func(graph_module)

    for batch in (1, 2):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        layer, rotary = model.base_model.layers[0], model.base_model.rotary_emb
        names = [name for name, _ in layer.named_parameters()]
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
            hidden = torch.empty(batch, seq_len, config.hidden_size, dtype=dtype, requires_grad=True)
            positions = torch.arange(seq_len).unsqueeze(0)
            cos, sin = rotary(hidden, positions)

            def forward(hidden, cos, sin, *params):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    out = torch.func.functional_call(
                        layer,
                        dict(zip(names, params)),
                        (hidden,),
                        dict(position_embeddings=(cos, sin), position_ids=positions),
                    )
                return out[0] if isinstance(out, tuple) else out

            partition = (
                functools.partial(min_cut_rematerialization_partition, compiler="inductor")
                if compiled
                else default_partition
            )
            traced = aot_function(
                forward, fw_compiler=keep_saved, bw_compiler=lambda gm, _: make_boxed_func(gm), partition_fn=partition
            )
            traced(hidden, cos, sin, *layer.parameters()).sum().backward()
    return (saved[1] - saved[0]) / seq_len


def backward_working_set(
    config, batch: int, seq_len: int, precision: str, attn_implementation: str, recompute_cls: Optional[str] = None
) -> Tuple[float, float, float]:
    """Run a two-layer copy of the model forward and backward on fake tensors under torch's ``MemTracker``
    (``recompute_cls`` recomputed with the runtime's ``apply_recompute``). Returns the peak memory during
    the first layer's backward, the memory just before the last layer's backward, and the last layer's
    parameter bytes (its gradients)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker, _ModState
    from transformers import AutoModelForCausalLM

    from .runtime.recompute import apply_recompute

    config = copy.deepcopy(config)
    config._attn_implementation = attn_implementation
    config.num_hidden_layers = 2
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=WEIGHT_DTYPES.get(precision, torch.float32))
    if recompute_cls:
        apply_recompute(model, [recompute_cls])
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        ids = torch.randint(0, config.vocab_size, (batch, seq_len))
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker, torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)).float(), ids.view(-1))
            del logits
            loss.backward()
    first, last = model.base_model.layers[0], model.base_model.layers[-1]

    def total(layer, state):
        return max(s[torch.device("cpu")]["Total"] for s in tracker.memory_tracking[layer].snapshots[state])

    grads = sum(p.numel() * p.element_size() for p in last.parameters())
    return total(first, _ModState.PEAK_BW), total(last, _ModState.PRE_BW), float(grads)
