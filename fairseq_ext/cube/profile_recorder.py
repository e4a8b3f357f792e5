"""The measurement of a shard model's modules on fake tensors, for ``profile.py``: one forward and backward
whose ``saved_tensors_hooks`` record every tensor autograd keeps (per top-level module, and what
recomputing a class would keep instead) and whose ``FlopCounterMode`` counts the matmuls."""

import copy
from typing import Dict, List, Tuple

import torch

from .profile_memory import backward_working_set
from .profile_types import WEIGHT_DTYPES, Activations


def measure_modules(config, seq_len: int, precision: str, attn_implementation: str, class_names):
    """Run the shard model on fake tensors at batch 1 and 2; return per-module profile fields and shared bytes."""
    runs = [
        SavedTensorRecorder(config, batch, seq_len, precision, attn_implementation, class_names).run()
        for batch in (1, 2)
    ]

    def split(one: float, two: float) -> Tuple[float, float]:
        per_token = (two - one) / seq_len
        return per_token, max(0.0, one - per_token * seq_len)

    # A layer's backward rises above what it keeps by its gradients and its intermediates' gradients
    # (measured); a recomputed one also by the activations it rebuilds (kept without - kept with recompute).
    layer_class = runs[0]["layers"]["class"]

    def rise(cls):
        """Per token and fixed: the first layer's backward peak above where a module-by-module walk (each
        earlier backward: + its gradients - its kept activations) would have memory; so whatever a layer's
        backward leaves behind for the next one is counted (non-reentrant checkpoint holds some)."""
        values = []
        for batch, run in zip((1, 2), runs):
            kept = run["layers"]["kept"] if cls is None else run["layers"]["recompute"][cls]
            peak_first, before_last, grads = backward_working_set(
                config, batch, seq_len, precision, attn_implementation, cls
            )
            values.append(peak_first - before_last - grads + kept)
        return split(*values)

    ws_per_token, ws_fixed = rise(None)
    rc_per_token, rc_fixed = rise(layer_class)  # recomputing the whole layer is measured: the common choice
    out = {}
    for name in ("embed", "layers", "norm", "head"):
        one, two = runs[0][name], runs[1][name]
        full = Activations(*split(one["kept"], two["kept"]))
        recompute = {}
        for cls, kept in one["recompute"].items():
            kept = Activations(*split(kept, two["recompute"][cls]))
            if cls == layer_class:
                up = (rc_per_token, rc_fixed)
            else:
                up = (full.per_token - kept.per_token + ws_per_token, full.fixed - kept.fixed + ws_fixed)
            recompute[cls] = (Activations(kept.per_token, kept.fixed, *up), one["recompute_flops"][cls] / seq_len)
        if name == "layers":
            transient = (ws_per_token, ws_fixed)
        else:
            transient = ((two["transient"] - one["transient"]) / seq_len, 0.0)
        out[name] = dict(
            class_name=one["class"],
            activations=Activations(full.per_token, full.fixed, *transient),
            recompute=recompute,
            fwd_flops_per_token=one["flops"] / seq_len,
            attention_flops_per_token=attention_core_flops(config, 1, seq_len) / seq_len if name == "layers" else 0.0,
        )
    return out, Activations(*split(runs[0]["shared"], runs[1]["shared"]))


def attention_core_flops(config, batch: int, seq_len: int) -> float:
    """Forward FLOPs of one layer's QK^T and PV over full T x T matrices, as FlopCounterMode counts SDPA."""
    return 4.0 * batch * seq_len**2 * config.head_dim * config.num_attention_heads


class SavedTensorRecorder:
    """One fake forward + backward of a (shard) model, recording per top-level module: bytes autograd keeps
    (deduplicated by storage; parameters excluded, they are counted as weights), what recomputing a class
    would keep instead (its tensor inputs plus what the rest of the layer saves), and forward FLOPs."""

    def __init__(self, config, batch: int, seq_len: int, precision: str, attn_implementation: str, class_names):
        self.config = copy.deepcopy(config)
        self.config._attn_implementation = attn_implementation
        self.batch, self.seq_len, self.precision = batch, seq_len, precision
        self.eager = attn_implementation == "eager"
        self.class_names = set(class_names)
        self.stack: List[Tuple[str, str]] = []  # (top-level module, class) of the modules running now
        self.saved: Dict[int, Tuple[int, set]] = {}  # storage id -> (bytes, owners: {(top, class)})
        self.inputs: Dict[Tuple[str, str], Dict[int, int]] = {}  # (top, class) -> {storage id: bytes}
        self.alive: List[torch.Tensor] = []

    def run(self) -> dict:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.utils.flop_counter import FlopCounterMode
        from transformers import AutoModelForCausalLM

        dtype = WEIGHT_DTYPES.get(self.precision, torch.float32)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        base = model.base_model
        tops = {"embed": base.embed_tokens, "norm": base.norm, "head": model.get_output_embeddings()}
        tops.update({f"layers.{i}": layer for i, layer in enumerate(base.layers)})
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")  # in place: ``tops`` stay the model's modules
            params = {p.untyped_storage()._cdata for p in model.parameters()}
            handles = [
                hook
                for top, module in tops.items()
                for sub in module.modules()
                if sub is module or type(sub).__name__ in self.class_names
                for hook in self._hook(top, sub)
            ]

            def pack(t):
                sid = t.untyped_storage()._cdata
                if sid not in params:
                    owners = self.saved.setdefault(sid, (t.untyped_storage().nbytes(), set()))[1]
                    owners.update(self.stack or [("head", "loss")])  # the loss runs outside every module
                return t

            ids = torch.randint(0, self.config.vocab_size, (self.batch, self.seq_len))
            flops = FlopCounterMode(display=False)
            with (
                flops,
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"),
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            ):
                logits = model(input_ids=ids).logits
                loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)).float(), ids.view(-1))
            # The loss's backward holds two fp32 logits-sized gradients at once (nll_loss's and log_softmax's),
            # and under autocast the low-precision gradient of the logits next.
            logits_grad_bytes = logits.numel() * (8 + (logits.element_size() if logits.element_size() < 4 else 0))
            loss.backward()
        for handle in handles:
            handle.remove()
        return self._collect(model, tops, flops.get_flop_counts(), logits_grad_bytes)

    def _hook(self, top: str, module):
        key = (top, type(module).__name__)

        def pre(mod, args, kwargs):
            self.stack.append(key)
            found = self.inputs.setdefault(key, {})
            for value in list(args) + list(kwargs.values()):
                for t in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        found[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
                        self.alive.append(t)  # a freed storage's id could be reused by a later tensor

        def post(mod, args, output):
            self.stack.pop()

        return module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)

    def _attention_core_flops(self) -> float:
        """The attention core's FLOPs where FlopCounterMode misses them: on the CPU the SDPA kernel is not
        counted, so it is added here (eager attention's matmuls are counted already)."""
        if self.eager:
            return 0.0
        return attention_core_flops(self.config, self.batch, self.seq_len)

    def _collect(self, model, tops, flop_counts, logits_grad_bytes) -> dict:
        module_flops = {key.split(".", 1)[1]: float(sum(v.values())) for key, v in flop_counts.items() if "." in key}
        classes = {name: type(m).__name__ for name, m in model.named_modules()}
        fqns = {top: _fqn(model, module) for top, module in tops.items()}
        result = {
            top: {
                "kept": 0.0,
                "transient": 0.0,
                "class": type(module).__name__,
                "flops": module_flops.get(fqns[top], 0.0),
                "recompute": {},
                "recompute_flops": {},
            }
            for top, module in tops.items()
        }
        result["shared"] = 0.0
        layer_tops = [top for top in tops if top.startswith("layers.")]
        for top in layer_tops:
            result[top]["flops"] += self._attention_core_flops()
        shared = set()
        for sid, (nbytes, owners) in self.saved.items():
            owner_tops = {top for top, _ in owners}
            if len(owner_tops) > 1:
                shared.add(sid)  # saved by several layers (rotary cos/sin), or by a layer and the next module
                result["shared"] += nbytes
            else:
                result[owner_tops.pop()]["kept"] += nbytes
        result["head"]["transient"] = float(logits_grad_bytes)
        for top in layer_tops:
            for cls in self.class_names:
                if (top, cls) not in self.inputs:
                    continue
                keep = {
                    sid: nbytes
                    for sid, (nbytes, owners) in self.saved.items()
                    if sid not in shared and {t for t, _ in owners} == {top} and (top, cls) not in owners
                }
                keep.update({sid: nbytes for sid, nbytes in self.inputs[(top, cls)].items() if sid not in shared})
                result[top]["recompute"][cls] = float(sum(keep.values()))
                result[top]["recompute_flops"][cls] = self._class_flops(fqns[top], cls, classes, module_flops)
        layers = {
            key: sum(result[t][key] for t in layer_tops) / len(layer_tops) for key in ("kept", "transient", "flops")
        }
        for key in ("recompute", "recompute_flops"):
            layers[key] = {
                cls: sum(result[t][key][cls] for t in layer_tops) / len(layer_tops)
                for cls in result[layer_tops[0]][key]
            }
        layers["class"] = result[layer_tops[0]]["class"]
        return {
            "embed": result["embed"],
            "layers": layers,
            "norm": result["norm"],
            "head": result["head"],
            "shared": result["shared"],
        }

    def _class_flops(self, layer_fqn: str, cls: str, classes, module_flops) -> float:
        """Forward FLOPs of the outermost modules of class ``cls`` in a layer: what recomputing them repeats."""
        names = [
            name for name in classes if (name == layer_fqn or name.startswith(layer_fqn + ".")) and classes[name] == cls
        ]
        outermost = [n for n in names if not any(n != o and n.startswith(o + ".") for o in names)]
        total = sum(module_flops.get(name, 0.0) for name in outermost)
        if cls in (classes[layer_fqn], classes.get(f"{layer_fqn}.self_attn")):
            total += self._attention_core_flops()
        return total


def _fqn(model, module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise AssertionError("module not in model")
