"""fairseq models around Hugging Face Auto classes."""

from .hf_auto import (  # noqa: F401
    HFAutoBase,
    HFAutoCausalLM,
    HFAutoModel,
    HFAutoQuestionAnswering,
    HFAutoSeq2SeqLM,
    HFAutoSequenceClassification,
    HFAutoTokenClassification,
)
