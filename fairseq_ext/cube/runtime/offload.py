"""Activation offloading: what the named module classes save for their backward waits in pinned host memory.

``OFFLOAD_ACTIVATIONS=1`` (or a plan's ``offload_modules``) wraps every module of the named classes (the
decoder layers) so that, while its forward runs, autograd's saved tensors go through
:class:`HostOffload`'s pack and unpack hooks (``torch.autograd.graph.saved_tensors_hooks``, the mechanism of
torch's ``save_on_cpu``): each saved activation of at least ``min_bytes`` is copied to pinned host memory
and its GPU memory freed (a tensor several operations save is copied once); the backward copies it back when
it needs it. The layer's own parameters (and views of them) and small tensors stay on the device. Results are unchanged: the values round-trip exactly.

Unlike ``save_on_cpu``, the copy to the host is issued without the host waiting for it (``non_blocking``
into pinned memory, on the compute stream, which orders it before any kernel that reuses the freed
memory), so the host keeps running ahead of the GPU; the copies themselves still take their time on the
stream (the cost model adds bytes / ``Hardware.host_bandwidth`` each way).

Compiled layers (COMPILE=1): the wrapper stays eager and the compiled layer inside it saves its tensors
through AOTAutograd's ``CompiledFunction``, which runs hooks that are plain Python functions at run time on
the tensors its partitioner saved (torch only inlines hooks that are ``fx.GraphModule``s, and then only on
graph intermediates; dynamo's guard on saved-tensor hooks ignores plain ones, so nothing recompiles).

A recomputed layer keeps only its inputs, so the plan never names one class for both
(``Plan.validate``). Host memory is the point, so runs off CUDA are refused (:func:`check_device`).
"""

import logging
import weakref
from typing import Iterable, List, Set

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper

from ...errors import UserInputError

logger = logging.getLogger(__name__)

MIN_BYTES = 1 << 20  # saved tensors below this stay on the device: their copy costs more in latency than it frees


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors of at least ``min_bytes`` (parameters and their views excepted: ``kept_storages`` holds
    their storages' addresses) are packed into host memory, pinned when ``pin_memory``, and unpacked on
    their device. ``stats`` counts the bytes moved (``offloaded``) and kept (``kept``) by this context."""

    def __init__(self, kept_storages: Set[int], pin_memory: bool = True, min_bytes: int = MIN_BYTES):
        self.stats = {"offloaded": 0, "kept": 0, "tensors": 0}
        copies = {}  # one host copy of a tensor that several operations save (the same view at the same version)

        def pack(tensor: torch.Tensor):
            nbytes = tensor.numel() * tensor.element_size()
            if (
                nbytes < min_bytes
                or type(tensor) is not torch.Tensor  # tensor subclasses (DTensor, float8) keep their own layout
                or tensor.untyped_storage().data_ptr() in kept_storages
            ):
                self.stats["kept"] += nbytes
                return tensor
            # the same tensor object at the same version; a weak reference, so that a tensor freed after its copy
            # (whose memory and id a later one may take) never matches
            seen = copies.get(id(tensor))
            if seen is not None and seen[0]() is tensor and seen[1] == tensor._version:
                return seen[2]
            host = torch.empty_strided(
                tensor.size(), tensor.stride(), dtype=tensor.dtype, device="cpu", pin_memory=pin_memory
            )
            host.copy_(tensor, non_blocking=pin_memory)
            copies[id(tensor)] = (weakref.ref(tensor), tensor._version, (tensor.device, host))
            self.stats["offloaded"] += nbytes
            self.stats["tensors"] += 1
            return tensor.device, host

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, host = packed
            return host.to(device, non_blocking=pin_memory)

        super().__init__(pack, unpack)


class OffloadWrapper(ActivationWrapper):
    """A module whose forward saves its activations for backward in host memory (:class:`HostOffload`).
    Torch's activation wrapper base: parameter names and state dicts are those of the wrapped module."""

    def __init__(self, module: torch.nn.Module, pin_memory: bool = True, min_bytes: int = MIN_BYTES):
        super().__init__(module)
        self.pin_memory = pin_memory
        self.min_bytes = min_bytes
        self.last_stats = {}

    def forward(self, *args, **kwargs):
        # taken at each call: FSDP2 puts the unsharded parameters in place before this forward runs
        kept = {p.untyped_storage().data_ptr() for p in self._checkpoint_wrapped_module.parameters()}
        hooks = HostOffload(kept, self.pin_memory, self.min_bytes)
        with hooks:
            out = self._checkpoint_wrapped_module(*args, **kwargs)
        self.last_stats = hooks.stats
        return out


def apply_offload(
    model: torch.nn.Module, class_names: Iterable[str], pin_memory: bool = True, min_bytes: int = MIN_BYTES
) -> int:
    """Wrap, in place, every submodule whose class name is in ``class_names`` with :class:`OffloadWrapper`;
    return how many. ``pin_memory`` False is for tests on the CPU (pinning needs CUDA).

    Raises:
        UserInputError: a name that is no class of the model, or a module of it already wrapped for recompute.
    """
    names = set(class_names)
    if not names:
        return 0
    present = sorted({type(module).__name__ for module in model.modules()})
    unknown = sorted(names - set(present))
    if unknown:
        raise UserInputError(
            f"offload_modules {', '.join(unknown)}: no module of the model has that class; "
            f"its module classes are: {', '.join(present)}"
        )
    targets: List[tuple] = []
    for parent in model.modules():
        if isinstance(parent, OffloadWrapper):
            continue
        for child_name, child in parent.named_children():
            if type(child).__name__ in names:
                targets.append((parent, child_name, child))
    for parent, child_name, child in targets:
        setattr(parent, child_name, OffloadWrapper(child, pin_memory=pin_memory, min_bytes=min_bytes))
    return len(targets)


def offloaded_modules(model: torch.nn.Module) -> List[OffloadWrapper]:
    """The model's offload wrappers, in module order."""
    return [m for m in model.modules() if isinstance(m, OffloadWrapper)]


def check_device(on_gpu: bool) -> None:
    """Refuse offloading where there is no GPU memory to free: on the CPU the activations already live in
    host memory, and pinned memory needs CUDA."""
    if not on_gpu:
        raise UserInputError(
            "OFFLOAD_ACTIVATIONS=1 moves activations from GPU memory to pinned host memory; this run trains on "
            "the CPU, where they already are in host memory: set OFFLOAD_ACTIVATIONS=0"
        )


def apply_plan_offload(module: torch.nn.Module, plan) -> None:
    """Offload the plan's module classes (``plan.offload_modules``) unless they are wrapped already."""
    if plan.offload_modules and not offloaded_modules(module):
        count = apply_offload(module, plan.offload_modules)
        logger.info(
            f"activation offloading: {count} modules ({', '.join(plan.offload_modules)}) keep their saved "
            f"activations of at least {MIN_BYTES >> 20} MiB in pinned host memory"
        )
