"""A user's own --user-dir, as the example README shows: it imports fairseq_ext and adds to it.

fairseq loads one --user-dir, so a user's package imports fairseq_ext first (which registers the
task, archs and criteria) and then registers its own dataset type, prompt template and criterion.
"""

import fairseq_ext  # noqa: F401  (registers hf_finetune, hf_auto_causal_lm, hf_causal_lm)
from fairseq import metrics
from fairseq.criterions import register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq_ext.criterions.lm_loss import CausalLMLoss
from fairseq_ext.data import PromptTemplate, register_dataset_type, register_prompt_template
from fairseq_ext.data.instruction import tokenize_instruction
from fairseq_ext.data.prompts import get_prompt_template
from fairseq_ext.data.records import read_json_records

register_prompt_template("question", PromptTemplate(with_input="Q: {instruction} [{input}]\nA: ",
                                                    without_input="Q: {instruction}\nA: "))


@register_dataset_type("shouted")
def build_shouted_split(cfg, split, tokenizer):
    """Raw records in, tokenized samples out: the shipped records with upper-case instructions."""
    records = read_json_records(f"{cfg.data}/{cfg.dataset_name}_{split}.json")
    template = get_prompt_template(cfg.prompt_type)
    return [tokenize_instruction(tokenizer, template.render(r["instruction"].upper(), r.get("input", "")),
                                 r["output"]) for r in records]


@register_criterion("answer_tokens_lm", dataclass=FairseqDataclass)
class AnswerTokensLoss(CausalLMLoss):
    """The causal LM loss, plus the mean number of trained tokens per sample as a logged metric."""

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        CausalLMLoss.reduce_metrics(logging_outputs)
        tokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        sentences = sum(log.get("nsentences", 0) for log in logging_outputs)
        metrics.log_scalar("answer_tokens", tokens / max(sentences, 1), sentences, round=3)
