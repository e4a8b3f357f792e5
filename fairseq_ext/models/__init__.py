"""fairseq models around Hugging Face Auto classes."""

from .hf_auto import (HFAutoBase, HFAutoCausalLM, HFAutoModel, HFAutoQuestionAnswering,  # noqa: F401
                      HFAutoSeq2SeqLM, HFAutoSequenceClassification, HFAutoTokenClassification)
