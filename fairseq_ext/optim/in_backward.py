"""The optimizer step inside the backward (``OPTIMIZER_IN_BACKWARD=1``): each weight stepped as soon as its
gradient is final, and that gradient freed at once, so the run never holds every gradient.

A full finetune holds a gradient per weight from the backward to the step: 2 bytes per parameter in bf16
(16 GB of an 8B model), as much as the bf16-lean moments. Here ``Tensor.register_post_accumulate_grad_hook``
(as torchtune's optimizer-in-backward) runs the step of one weight once autograd has added its last gradient
contribution (a weight used twice, such as tied embeddings, once both arrived), and sets the gradient to None:
only the gradients of the layer whose backward runs exist at a time.

The step is the one :class:`~fairseq_ext.optim.adamw.MixedPrecisionAdamW` takes for all weights, taken a layer at a
time (``step_parameters``): the weights of one layer of a ``ModuleList`` (a decoder layer; :func:`layer_step_groups`)
are stepped together, in one launch of the fused step, once the last of their gradients is final; a weight
outside such a layer alone; whatever the backward left incomplete (a weight without a gradient in this backward)
at its end. The same kernels, learning rate, weight decay and fairseq's gradient factor,
1 / sample size, which fairseq applies after the backward (``multiply_grads``) and which is known once the
criterion's forward has given the sample size (:meth:`OptimizerInBackward.arming` sets it then). The numbers
are the step's own: fp32 and bf16-master give the same weights (the CPU's fused kernel in place of its
multi-tensor one: within float32 rounding), bf16-lean the same in distribution (its stochastic rounding draws
other noise). The gradient norm fairseq logs is gathered as the hooks run: each gradient's float32 norm, kept
on the device, combined when fairseq asks (no wait for the device).

What cannot give the same numbers is refused before training (``cube/model_spec.py``
``optimizer_in_backward_reasons``): clipping (its norm needs every gradient first), accumulation over
``--update-freq`` or micro-batches (gradients must survive between backwards), several processes, fp16.
A layer with a gradient that is not finite is not stepped (decided on the device); the layers stepped before it
in that backward keep their step, and the run stops as fairseq stops it ("gradients are Nan/Inf").
"""

import re
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from .adamw import MixedPrecisionAdamW

_LAYER_INDEX = re.compile(r"^(.*?\.\d+)\.")


class OptimizerInBackward:
    """Steps the weights of ``optimizer`` from their gradient hooks (see the module docstring).

    Outside an armed backward (:meth:`arming`) the hooks leave the gradients as autograd made them: fairseq's
    NanDetector runs the batch again to name the module with non-finite values, and that changes no weight.
    """

    def __init__(self, optimizer: MixedPrecisionAdamW, step_groups: Iterable[List[torch.Tensor]] = ()):
        self.optimizer = optimizer
        self._group: Dict[int, dict] = {}
        self._index: Dict[int, int] = {}  # the weight's position in the optimizer, the order norms combine in
        self._handles = []
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.requires_grad:
                    self._group[id(param)], self._index[id(param)] = group, len(self._index)
                    self._handles.append(param.register_post_accumulate_grad_hook(self._arrived))
        self._step_group: Dict[int, int] = {}  # weight -> its step group; weights in none are stepped alone
        self._group_size: List[int] = []
        for params in step_groups:
            stepped = [p for p in params if id(p) in self._index]
            for param in stepped:
                self._step_group[id(param)] = len(self._group_size)
            self._group_size.append(len(stepped))
        self._pending: Dict[int, List[torch.Tensor]] = {}  # step group -> its weights with a final gradient
        self._end_queued = False
        self._grad_scale = None  # this backward's gradient factor; None: not armed
        self._scale_used = None  # the factor of the update's backward, for fairseq's multiply_grads to match
        self._fresh_update = False  # the update's first task step is still to run
        self._norms: Dict[int, torch.Tensor] = {}

    def _arrived(self, param: torch.Tensor) -> None:
        if self._grad_scale is None:
            return
        if not self._end_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._step_pending)
            self._end_queued = True
        key = self._step_group.get(id(param))
        if key is None:
            self._step([param])
            return
        pending = self._pending.setdefault(key, [])
        pending.append(param)
        if len(pending) == self._group_size[key]:
            self._step(self._pending.pop(key))

    def _step_pending(self) -> None:
        """At the backward's end: the step groups some of whose weights got no gradient in this backward."""
        self._end_queued = False
        for key in list(self._pending):
            self._step(self._pending.pop(key))

    def _step(self, params: List[torch.Tensor]) -> None:
        norms = torch._foreach_norm([p.grad for p in params], 2, dtype=torch.float32)
        for param, norm in zip(params, norms):
            self._norms[self._index[id(param)]] = norm
        total = norms[0] if len(norms) == 1 else torch.stack(norms).sum()
        found_inf = torch.logical_not(torch.isfinite(total)).to(torch.float32)
        scales = torch.is_tensor(self._grad_scale) or self._grad_scale != 1.0
        by_group: Dict[int, Tuple[dict, List[torch.Tensor]]] = {}
        for param in params:
            group = self._group[id(param)]
            by_group.setdefault(id(group), (group, []))[1].append(param)
        for group, stepped in by_group.values():
            self.optimizer.step_parameters(group, stepped, self._grad_scale if scales else None, found_inf=found_inf)
        for param in params:
            param.grad = None

    def start_update(self) -> None:
        """A new update: its first task step will run with the step inside its backward."""
        self._fresh_update, self._scale_used, self._norms = True, None, {}
        self._pending, self._end_queued = {}, False

    def arming(self, train_step: Callable) -> Callable:
        """``train_step`` (the task's: criterion forward, then backward) with the criterion's sample size made
        the gradient factor of its backward, for the update's first call; later calls of the same update (a
        rerun under fairseq's NanDetector) run as they are."""

        def step(*args, **kwargs):
            if not self._fresh_update:
                return train_step(*args, **kwargs)
            self._fresh_update = False
            if "criterion" in kwargs:
                kwargs["criterion"] = _FactorFromSampleSize(kwargs["criterion"], self._arm)
            else:
                args = (*args[:2], _FactorFromSampleSize(args[2], self._arm), *args[3:])
            try:
                return train_step(*args, **kwargs)
            finally:
                self._grad_scale = None

        return step

    def _arm(self, sample_size) -> None:
        # fairseq's factor: data-parallel size (1) / (sample_size or 1.0), with its float cast (Trainer.train_step)
        if torch.is_tensor(sample_size):
            sample_size = sample_size.float()
            self._grad_scale = 1 / torch.where(sample_size == 0, torch.ones_like(sample_size), sample_size)
        else:
            self._grad_scale = 1 / (float(sample_size) or 1.0)
        self._scale_used = self._grad_scale

    def check_factor(self, factor) -> None:
        """fairseq's ``multiply_grads(factor)`` after the backward: the gradients it means are already stepped;
        the factor they were stepped with must be this one (compared where both are numbers)."""
        used = self._scale_used
        if used is not None and not torch.is_tensor(used) and not torch.is_tensor(factor):
            assert used == factor, f"the step inside the backward used gradient factor {used}, fairseq's is {factor}"

    def grad_norm(self) -> Optional[torch.Tensor]:
        """The 2-norm of the update's gradients times the factor they were stepped with (what fairseq logs as
        gnorm), None when no gradient was stepped."""
        if not self._norms:
            return None
        norm = torch.linalg.vector_norm(torch.stack([self._norms[i] for i in sorted(self._norms)]))
        return norm if self._scale_used is None else norm * self._scale_used

    def remove(self) -> None:
        """Take the hooks off the weights."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def layer_step_groups(named_parameters: Iterable[Tuple[str, torch.Tensor]]) -> List[List[torch.Tensor]]:
    """The weights stepped together inside the backward: those of one element of a ``ModuleList`` (the name up to
    its first numbered part: ``model.layers.3``, a decoder layer), in the order the names come."""
    groups: Dict[str, List[torch.Tensor]] = {}
    for name, param in named_parameters:
        layer = _LAYER_INDEX.match(name)
        if layer is not None:
            groups.setdefault(layer.group(1), []).append(param)
    return list(groups.values())


class _FactorFromSampleSize:
    """A criterion that hands its sample size to ``arm`` before returning, i.e. before the task's backward."""

    def __init__(self, criterion, arm: Callable):
        self._criterion, self._arm = criterion, arm

    def __call__(self, *args, **kwargs):
        loss, sample_size, logging_output = self._criterion(*args, **kwargs)
        self._arm(sample_size)
        return loss, sample_size, logging_output

    def __getattr__(self, name):
        return getattr(self._criterion, name)
