"""Attention inside each document of packed rows, with no attention mask built (``document_varlen``).

Packed rows (``data/packing.py``) hold several documents one after another. The batch carries each row's
document lengths (``document_lengths``, the padding at a row's end one more segment); the model turns them
into cumulative offsets over all tokens of the batch (``document_kwargs``) and passes them to every
attention call as Hugging Face's flash-attention keywords (``cu_seq_lens_q``/``_k``, ``max_length_q``/``_k``).
The attention function registered here under :data:`ATTENTION_NAME` runs

- on CUDA: torch's variable-length kernel ``torch.nn.attention.varlen.varlen_attn`` (flash attention over
  the documents laid end to end; grouped-query attention by fewer key/value heads);
- on CUDA without it: FlexAttention with a document ``BlockMask``;
- on the CPU: ``scaled_dot_product_attention`` once per document (FlexAttention has no backward there).

Hugging Face builds masks only for attention implementations it knows, so none is built for this one: no
(B, 1, T, T) mask and no check of the positions on the device. Calls without document offsets (unpacked
batches, right-padded) get plain causal SDPA, which is what a causal model computes for its real tokens.
"""

import contextlib
import inspect
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION_NAME = "document_varlen"

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None

_VARLEN_PARAMS = set(inspect.signature(varlen_attn).parameters) if varlen_attn is not None else set()


def document_kwargs(document_lengths: torch.Tensor, max_document_length: int) -> Dict:
    """The attention keywords of a packed batch: ``document_lengths`` (B, D), each row's segment lengths in
    order, 0 after its last, as cumulative offsets over the batch's B*T tokens (int32, B*D+1 entries: a
    zero-length segment repeats an offset, so the size depends on the batch's shape only)."""
    offsets = F.pad(document_lengths.flatten().cumsum(0), (1, 0)).to(torch.int32)
    torch._dynamo.maybe_mark_dynamic(offsets, 0)  # compiled layers: one graph for any number of documents
    return dict(
        cu_seq_lens_q=offsets,
        cu_seq_lens_k=offsets,
        max_length_q=int(max_document_length),
        max_length_k=int(max_document_length),
    )


def document_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, H, T, head_dim)
    key: torch.Tensor,  # (B, H_kv, T, head_dim)
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs,
):
    """Hugging Face attention function: causal attention inside each document given by ``cu_seq_lens_q``;
    returns ((B, T, H, head_dim), None)."""
    offsets = kwargs.get("cu_seq_lens_q")
    if offsets is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if dropout:
        raise ValueError(f"{ATTENTION_NAME} attention has no dropout; set the model's attention_dropout to 0")
    batch, heads, length, head_dim = query.shape
    # (B, H, T, d) -> (B*T, H, d): the documents of all rows end to end
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.size(1), head_dim) for t in (query, key, value))
    if query.is_cuda and varlen_attn is not None:
        out = _varlen(q, k, v, offsets, kwargs["max_length_q"], scaling)
    elif query.is_cuda:
        out = _flex(q, k, v, offsets, scaling)
    else:
        out = _per_document(q, k, v, offsets, scaling)
    return out.view(batch, length, heads, head_dim), None


def _varlen(q, k, v, offsets, max_length: int, scaling):
    extra = {"window_size": (-1, 0)} if "window_size" in _VARLEN_PARAMS else {"is_causal": True}
    if "enable_gqa" in _VARLEN_PARAMS and k.size(1) != q.size(1):
        extra["enable_gqa"] = True
    return varlen_attn(q, k, v, offsets, offsets, max_length, max_length, scale=scaling, **extra)


def _flex(q, k, v, offsets, scaling):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    tokens = q.size(0)
    document = torch.searchsorted(offsets[1:], torch.arange(tokens, device=q.device, dtype=offsets.dtype), right=True)

    def same_document_causal(b, h, q_idx, kv_idx):
        return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)

    block_mask = create_block_mask(same_document_causal, None, None, tokens, tokens, device=q.device)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, N, d)
    out = flex_attention(q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=k.size(1) != q.size(1))
    return out.squeeze(0).transpose(0, 1)


def _per_document(q, k, v, offsets, scaling):
    groups = q.size(1) // k.size(1)
    k, v = (t.repeat_interleave(groups, dim=1) if groups > 1 else t for t in (k, v))
    bounds = offsets.tolist()
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            qd, kd, vd = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (H, n, d)
            parts.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scaling).transpose(0, 1))
    return torch.cat(parts)


@contextlib.contextmanager
def masked_attention(hf_model):
    """Inside, a model on ``document_varlen`` runs SDPA with Hugging Face's masks (generation: left padding
    and a key/value cache need them); other models are left as they are."""
    config = getattr(hf_model, "config", None)
    if getattr(config, "_attn_implementation", None) != ATTENTION_NAME:
        yield
        return
    hf_model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        hf_model.set_attn_implementation(ATTENTION_NAME)


AttentionInterface.register(ATTENTION_NAME, document_attention_forward)
