"""A user's own --user-dir, as the example README shows: it imports fairseq_ext and adds to it.

fairseq loads one --user-dir, so a user's package imports fairseq_ext first (which registers the
task, archs and criteria) and then registers its own dataset type, prompt template, criterion and model.
"""

from dataclasses import dataclass, field

from fairseq import metrics
from fairseq.criterions import register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from torch import nn

import fairseq_ext  # noqa: F401  (registers hf_finetune, hf_auto_causal_lm, hf_causal_lm)
from fairseq_ext.criterions.lm_loss import CausalLMLoss
from fairseq_ext.data import PromptTemplate, register_dataset_type, register_prompt_template
from fairseq_ext.data.instruction import tokenize_instruction
from fairseq_ext.data.prompts import get_prompt_template
from fairseq_ext.data.records import read_json_records

register_prompt_template(
    "question", PromptTemplate(with_input="Q: {instruction} [{input}]\nA: ", without_input="Q: {instruction}\nA: ")
)


@register_dataset_type("shouted")
def build_shouted_split(cfg, split, tokenizer):
    """Raw records in, tokenized samples out: the shipped records with upper-case instructions."""
    records = read_json_records(f"{cfg.data}/{cfg.dataset_name}_{split}.json")
    template = get_prompt_template(cfg.prompt_type)
    return [
        tokenize_instruction(tokenizer, template.render(r["instruction"].upper(), r.get("input", "")), r["output"])
        for r in records
    ]


@register_criterion("answer_tokens_lm", dataclass=FairseqDataclass)
class AnswerTokensLoss(CausalLMLoss):
    """The causal LM loss, plus the mean number of trained tokens per sample as a logged metric."""

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        CausalLMLoss.reduce_metrics(logging_outputs)
        tokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        sentences = sum(log.get("nsentences", 0) for log in logging_outputs)
        metrics.log_scalar("answer_tokens", tokens / max(sentences, 1), sentences, round=3)


@dataclass
class GRULanguageModelConfig(FairseqDataclass):
    hidden_size: int = field(default=64, metadata={"help": "GRU width"})


@register_model("my_gru_lm", dataclass=GRULanguageModelConfig)
class GRULanguageModel(BaseFairseqModel):
    """A user's own nn.Module, trained by fairseq_ext's task and criterion: it declares the batch layout it
    reads (``causal_lm``: input_ids in, next-token logits out) and the criterion used by default."""

    layout = "causal_lm"
    default_criterion = "hf_causal_lm"

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.gru = nn.GRU(hidden_size, hidden_size, batch_first=True)
        self.out = nn.Linear(hidden_size, vocab_size)

    @classmethod
    def build_model(cls, cfg, task):
        return cls(len(task.tokenizer), cfg.hidden_size)

    def forward(self, input_ids, attention_mask=None):
        hidden, _ = self.gru(self.embed(input_ids))
        return self.out(hidden)
