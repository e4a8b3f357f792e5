"""fairseq models around Hugging Face Auto classes."""

from .hf_auto import HFAutoCausalLM, HFAutoModel  # noqa: F401
