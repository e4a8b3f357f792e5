"""Language-model losses: token-mean cross entropy over the trained (answer) tokens."""

import torch.nn.functional as F
from fairseq import metrics, utils
from fairseq.criterions import register_criterion
from fairseq.dataclass import FairseqDataclass
from torch.distributed.tensor import DTensor

from ..cube.runtime.chunked_loss import chunk_rows, linear_cross_entropy
from ..data.layouts import IGNORE_INDEX
from .base import HFCriterion, logging_output


def perplexity(nll_loss_base2) -> float:
    """2 ** the base-2 loss as fairseq's LM criteria log it (rounded to 2 places); 0 when no loss was logged
    (after a batch dropped for running out of memory there may be none)."""
    return utils.get_perplexity(nll_loss_base2)


@register_criterion("hf_causal_lm", dataclass=FairseqDataclass)
class CausalLMLoss(HFCriterion):
    """Summed cross entropy of the model's token logits against ``target`` where ``target != -100``.

    For a causal LM the batch's ``target`` is already shifted to the next token. ``sample_size`` is
    the number of trained tokens, so the loss is the token mean over the global batch.
    """

    # The runtime's pipeline computes exactly this loss per micro-batch; a subclass that changes forward sets False.
    supports_pipeline = True

    def forward(self, model, sample, reduce=True):
        target = sample["target"]  # (B, T)
        head = getattr(model, "fused_lm_head", lambda: None)() if reduce else None
        if head is not None:
            # The LM head applied chunk by chunk inside the loss: no (B, T, vocab) logits in memory.
            hidden = model(**sample["net_input"], features_only=True)  # (B, T, H)
            head = model.fused_lm_head()  # under FSDP2: the whole weight the forward gathered
            if isinstance(head, DTensor):
                head = head.full_tensor()
            loss = linear_cross_entropy(
                hidden.reshape(-1, hidden.size(-1)),
                head,
                target.view(-1),
                ignore_index=IGNORE_INDEX,
                chunk_size=chunk_rows(head.size(0)),
            )
        else:
            logits = model(**sample["net_input"])  # (B, T, V)
            loss = self.token_loss(logits, target, reduce=reduce)
        return loss, sample["ntokens"], logging_output(loss, sample, sample["ntokens"], nll_loss=loss.data)

    @staticmethod
    def token_loss(logits, target, reduce: bool = True):
        """Cross entropy of token ``logits`` (..., V) against ``target`` (...), in float32, over the tokens
        whose target is not IGNORE_INDEX: summed, or per token without ``reduce``. The runtime's pipeline
        computes each micro-batch's loss with it on the last stage."""
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(),
            target.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum" if reduce else "none",
        )

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        """Loss and nll_loss per trained token in base 2, and perplexity, as fairseq's LM criteria log them."""
        HFCriterion.reduce_metrics(logging_outputs)
        metrics.log_derived("ppl", lambda meters: perplexity(meters["nll_loss"].avg))


@register_criterion("hf_seq2seq_lm", dataclass=FairseqDataclass)
class Seq2SeqLMLoss(CausalLMLoss):
    """The same token cross entropy for encoder-decoder models: decoder logits against the (unshifted)
    answer labels, which the model fed to its decoder shifted right."""

    supports_pipeline = False
