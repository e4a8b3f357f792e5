"""Pipeline parallel with ``torch.distributed.pipelining``: a causal LM cut at decoder-layer boundaries.

A Plan with ``pp`` ranks and ``virtual_stages_per_rank`` v runs S = pp x v stages. Stage s holds a
contiguous slice of decoder layers (``plan.stage_boundaries``, else balanced by layer count); the first
stage also holds the token embeddings, the last one the final norm and the LM head. Stage s runs on
pp rank ``s % pp`` (the looped placement torch's interleaved schedule expects).

Hugging Face forwards do not tolerate missing layers, so a stage runs :class:`DecoderStage`, a small
forward over its slice that recomputes what the base model's forward computes before its layers
(positions, rotary embeddings, the causal + padding mask) with the model's own functions, so every
layer sees exactly what it sees in the single-process forward. Packed batches (one padding-free row of
documents, ``layouts.padding_free``) are laid out again as one row of whole documents per micro-batch
(:func:`documents_as_rows`); every stage receives the rows' ``position_ids`` and attends inside the documents
they start (``document_attention.py``), with no mask. The Hugging Face model itself is pruned
to the rank's modules (the others become ``None``): its state_dict keeps the single-process names and
its parameters are exactly the rank's, so fairseq's optimizer and checkpoints need no renaming.

The loss given to the schedule is the criterion's own (its summed token cross entropy per micro-batch); schedules
run with ``scale_grads=False``, so the gradients are those of the full batch's summed loss, and fairseq's
normalisation by ``sample_size`` stays exact.
"""

import inspect
import logging
import sys
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)
from torch.distributed.tensor import DTensor

from ...data.layouts import IGNORE_INDEX
from ...errors import UserInputError
from ...models.document_attention import document_kwargs
from ..model_spec import RunSettings, spec_of, stage_layers
from ..plan import Plan

SCHEDULES = {"GPipe": ScheduleGPipe, "1F1B": Schedule1F1B, "Interleaved1F1B": ScheduleInterleaved1F1B}
_BASE_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")
_MAX_CACHED_SCHEDULES = 8

logger = logging.getLogger(__name__)


def check_pipeline_model(hf_model, plan: Plan) -> None:
    """Raise UserInputError unless ``hf_model`` is a decoder-only LM that :class:`DecoderStage` can cut.

    Needs a Llama-style base model (``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``) and an LM head;
    what else a pipeline plan needs (untied embeddings, a layer per stage, settings) is the model spec's
    (``model_spec.ModelSpec.unsupported``), checked before.
    """
    base = hf_model.base_model
    missing = [name for name in _BASE_PARTS if getattr(base, name, None) is None]
    if hf_model.get_output_embeddings() is None or missing or base is hf_model:
        raise UserInputError(
            f"pipeline parallel (pp {plan.pp}) splits decoder-only causal LMs (Llama-style: embed_tokens, layers, "
            f"norm, rotary_emb, lm_head); {type(hf_model).__name__} lacks "
            f"{', '.join(missing) or 'an LM head'}; use a plan with pp 1 (tensor or data parallel) for it"
        )
    reasons = spec_of(hf_model.config).unsupported(plan, RunSettings(batch_size=plan.num_microbatches))
    if reasons:
        raise UserInputError(reasons[0])


def rank_stages(plan: Plan, pp_rank: int) -> List[int]:
    """Stage indices run by pipeline rank ``pp_rank``: ``pp_rank, pp_rank + pp, ...`` (looped placement)."""
    return list(range(pp_rank, plan.num_stages, plan.pp))


class DecoderStage(torch.nn.Module):
    """One pipeline stage of a Llama-style causal LM: ``(input_ids | hidden) -> hidden | logits``.

    The first stage embeds ``input_ids``; the last one applies the final norm and the LM head. Each stage
    computes positions, rotary embeddings and the attention mask (causal + padding) from its input as the
    base model's forward does, so the layers compute what they compute in one process.
    Args of ``forward``: ``x`` (B, T) token ids on the first stage, else (B, T, H) hidden states;
    ``attention_mask`` (B, T), 1 for tokens and 0 for padding (every stage receives it).
    """

    def __init__(self, hf_model, layers: Sequence[int], is_first: bool, is_last: bool):
        super().__init__()
        base = hf_model.base_model
        self.config = base.config
        self.is_first, self.is_last = is_first, is_last
        self.embed_tokens = base.embed_tokens if is_first else None
        self.layers = torch.nn.ModuleDict({str(i): base.layers[i] for i in layers})
        self.norm = base.norm if is_last else None
        self.lm_head = hf_model.get_output_embeddings() if is_last else None
        self.rotary_emb = base.rotary_emb
        self._create_mask = _mask_function(base)
        # transformers versions differ: some mask builders still take cache_position
        self._wants_cache_position = "cache_position" in inspect.signature(self._create_mask).parameters

    def forward(self, x, attention_mask=None, position_ids=None):
        hidden = self.embed_tokens(x) if self.is_first else x  # (B, T, H)
        documents = {}
        if position_ids is not None:  # rows of documents, each starting at position 0: no mask
            mask = None
            starts = (position_ids.flatten() == 0).nonzero().flatten()
            lengths = torch.diff(starts, append=starts.new_tensor([position_ids.numel()]))
            documents = document_kwargs(lengths.unsqueeze(0), int(lengths.max()))
        else:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            mask = self._create_mask(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                past_key_values=None,
                position_ids=position_ids,
                **({"cache_position": position_ids[0]} if self._wants_cache_position else {}),
            )
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers.values():
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                use_cache=False,
                **documents,
            )
            if isinstance(hidden, tuple):  # older transformers return (hidden_states, ...)
                hidden = hidden[0]
        if self.is_last:
            return self.lm_head(self.norm(hidden))  # (B, T, V)
        return hidden


def documents_as_rows(input_ids, position_ids, target, rows: int, pad_token_id: int):
    """A padding-free row (1, N) of whole documents (``position_ids`` restart at 0 for each) as ``rows`` rows of
    consecutive documents, about as many tokens each, right-padded to the longest: (rows, T) ids, positions
    and targets. A pad token is a document of its own (position 0) with an ignored target, so it changes no
    other token and adds nothing to the loss or the gradients."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [input_ids.shape[1]]
    bounds, total = [0], input_ids.shape[1]
    for index in range(1, rows):  # the document start nearest to an equal share of the tokens
        goal = total * index / rows
        bounds.append(max(bounds[-1], min(starts, key=lambda start: abs(start - goal))))
    bounds.append(total)
    length = max(max(b - a for a, b in zip(bounds, bounds[1:])), 1)
    out = []
    for source, value in ((input_ids, pad_token_id), (position_ids, 0), (target, IGNORE_INDEX)):
        rows_of = source.new_full((rows, length), value)
        for row, (a, b) in enumerate(zip(bounds, bounds[1:])):
            rows_of[row, : b - a] = source[0, a:b]
        out.append(rows_of)
    return tuple(out)


def _mask_function(base):
    """The mask builder the base model's own forward uses (``create_causal_mask`` of its module)."""
    module = sys.modules[type(base).__module__]
    create = getattr(module, "create_causal_mask", None)
    if create is None:
        from transformers.masking_utils import create_causal_mask as create
    return create


def split_model(hf_model, plan: Plan, pp_rank: int) -> List[Tuple[int, DecoderStage]]:
    """Build this rank's stage modules and prune ``hf_model`` to them, in place.

    Every rank must hold the same full model before the call (same seed or checkpoint); afterwards
    ``hf_model`` holds only this rank's parameters (other layers, embeddings, norm and head are ``None``),
    under their single-process names.

    Returns:
        ``[(stage_index, DecoderStage), ...]`` for the stages of ``pp_rank``, in order.
    """
    check_pipeline_model(hf_model, plan)
    base = hf_model.base_model
    layers = stage_layers(len(base.layers), plan.num_stages, plan.stage_boundaries)
    mine = rank_stages(plan, pp_rank)
    stages = [(s, DecoderStage(hf_model, layers[s], is_first=s == 0, is_last=s == plan.num_stages - 1)) for s in mine]
    kept = {i for s in mine for i in layers[s]}
    for i in range(len(base.layers)):
        if i not in kept:
            base.layers[i] = None
    if 0 not in mine:
        base.embed_tokens = None
    if plan.num_stages - 1 not in mine:
        base.norm = None
        head_name = next(
            name for name, module in hf_model.named_children() if module is hf_model.get_output_embeddings()
        )
        setattr(hf_model, head_name, None)
    logger.info(
        f"pipeline rank {pp_rank}: stages {mine}, decoder layers "
        f"{[f'{layers[s].start}-{layers[s].stop - 1}' for s in mine]} of {len(layers)} stages"
    )
    return stages


class PipelineRunner:
    """Runs this rank's stages under the plan's schedule: forward and backward of one batch.

    Args:
        stages: this rank's ``(stage_index, module)`` from :func:`split_model`.
        pp_group: the process group of the pipeline ranks of this scale unit (mesh axis ``pp``).
        token_loss: the criterion's loss of one micro-batch, ``(logits, target) -> summed loss`` over the
            trained tokens (``CausalLMLoss.token_loss``).
        dp_group: with several scale units, the group of this stage's data-parallel replicas (FSDP2 shards
            the stages over it): every batch is padded to the largest shape among them, so that they set up
            schedules, whose first step runs FSDP2's collectives to infer shapes, at the same steps.
    """

    def __init__(
        self,
        stages: List[Tuple[int, torch.nn.Module]],
        plan: Plan,
        pp_group,
        device: torch.device,
        token_loss: Callable,
        pad_token_id: int = 0,
        dp_group=None,
    ):
        self.stages, self.plan, self.pp_group, self.device = stages, plan, pp_group, device
        self.dp_group = dp_group
        self.token_loss = token_loss
        self.pad_token_id = pad_token_id
        self.num_stages = plan.num_stages
        self.has_last = any(s == self.num_stages - 1 for s, _ in stages)
        self._last_rank = (self.num_stages - 1) % plan.pp  # pp rank of the last stage
        self._schedules: Dict[tuple, object] = {}
        self._loss_scale = 1.0

    def _loss(self, logits, target):
        """The criterion's loss for one micro-batch, scaled as the step asks."""
        loss = self.token_loss(logits, target)
        return loss * self._loss_scale if self._loss_scale != 1.0 else loss

    def _schedule(self, shape: tuple):
        """A schedule whose stages were set up for micro-batches of ``shape`` (stage buffers are sized on
        first use, so each distinct batch shape gets its own, a few kept)."""
        schedule = self._schedules.get(shape)
        if schedule is None:
            if len(self._schedules) >= _MAX_CACHED_SCHEDULES:
                self._schedules.pop(next(iter(self._schedules)))
            stages = [
                PipelineStage(module, index, self.num_stages, self.device, group=self.pp_group)
                for index, module in self.stages
            ]
            cls = SCHEDULES[self.plan.pp_schedule]
            schedule = cls(
                stages if cls is ScheduleInterleaved1F1B else stages[0],
                self.plan.num_microbatches,
                loss_fn=self._loss,
                scale_grads=False,
            )
            self._schedules[shape] = schedule
        return schedule

    def _pad(self, input_ids, attention_mask, target, position_ids=None):
        """Pad the batch with untrained rows up to a multiple of the micro-batch count (a short last batch);
        with ``dp_group``, first to the most rows and positions of the replicas' batches.

        The rows are pad tokens with a full attention mask (no all-masked softmax) and ignored targets, and
        the positions are masked pad tokens after the sequence with ignored targets, so they add exactly
        zero to the loss and to every gradient. Rows of documents (``position_ids``) are padded with
        documents of one pad token each.
        """
        rows, length = input_ids.shape
        if self.dp_group is not None:
            size = torch.tensor([rows, length], device=self.device)
            dist.all_reduce(size, op=dist.ReduceOp.MAX, group=self.dp_group)
            rows, length = size.tolist()
        rows += (-rows) % self.plan.num_microbatches

        def more(t, value):
            t = torch.cat([t, t.new_full((t.shape[0], length - t.shape[1]), value)], dim=1)
            return torch.cat([t, t.new_full((rows - t.shape[0], length), value)])

        if (rows, length) == tuple(input_ids.shape):
            return input_ids, attention_mask, target, position_ids
        attention_mask = more(attention_mask, 0)
        attention_mask[input_ids.shape[0] :] = 1
        position_ids = None if position_ids is None else more(position_ids, 0)
        return more(input_ids, self.pad_token_id), attention_mask, more(target, IGNORE_INDEX), position_ids

    def run(
        self,
        input_ids,
        attention_mask,
        target,
        train: bool = True,
        loss_scale: float = 1.0,
        position_ids=None,
    ) -> torch.Tensor:
        """Forward (and with ``train``, backward) of one batch through the pipeline; ``position_ids``: the
        batch is one padding-free row of documents (packed), laid out as a row per micro-batch.

        Gradients accumulate into the stage parameters' ``.grad`` (as ``loss.backward()`` would), those of
        ``loss_scale`` x the batch's summed loss.

        Returns:
            the batch's summed token cross entropy (float32 scalar, unscaled), the same on every pp rank.
        """
        if position_ids is not None:
            input_ids, position_ids, target = documents_as_rows(
                input_ids, position_ids, target, self.plan.num_microbatches, self.pad_token_id
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask, target, position_ids = self._pad(input_ids, attention_mask, target, position_ids)
        kwargs = dict(attention_mask=attention_mask) if position_ids is None else dict(position_ids=position_ids)
        micro_batch = input_ids.shape[0] // self.plan.num_microbatches
        shape = (micro_batch, *input_ids.shape[1:])
        # The first step of a new schedule infers shapes with a real forward and backward, then clears the
        # gradients of FSDP2 stages: those of the update's earlier batches are kept aside meanwhile.
        kept = self._take_sharded_grads() if shape not in self._schedules else None
        schedule = self._schedule(shape)
        self._loss_scale = loss_scale
        losses: List[torch.Tensor] = []  # per micro-batch, filled on the last stage
        # args go to the first stage only; kwargs (the mask) are split the same way and given to every stage
        # (torch 2.11 refuses args on a rank without the first stage; newer versions ignore them)
        args = (input_ids,) if any(index == 0 for index, _ in self.stages) else ()
        if train:
            schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        else:
            schedule.eval(*args, target=target, losses=losses, **kwargs)
        if kept:
            for param, grad in kept.items():
                param.grad = grad if param.grad is None else grad + param.grad
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for loss in losses:
            total = total + _plain(loss).detach().float()
        if loss_scale not in (0.0, 1.0):
            total = total / loss_scale
        dist.broadcast(total, group=self.pp_group, group_src=self._last_rank)
        return total

    def _take_sharded_grads(self) -> Dict[torch.nn.Parameter, torch.Tensor]:
        """The gradients of this rank's FSDP2-sharded stage parameters, removed from them."""
        kept = {}
        for _, module in self.stages:
            if isinstance(module, FSDPModule):
                for param in module.parameters():
                    if param.grad is not None:
                        kept[param], param.grad = param.grad, None
        return kept


def _plain(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
