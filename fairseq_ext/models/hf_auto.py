"""fairseq models around Hugging Face ``AutoModelFor*`` classes."""

from dataclasses import dataclass, field

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from transformers import AutoModelForCausalLM

from .hf_loading import DTYPES, load_hf_model


@dataclass
class HFAutoModelConfig(FairseqDataclass):
    hf_dtype: ChoiceEnum(list(DTYPES)) = field(
        default="float32", metadata={"help": "dtype the Hugging Face weights are loaded in"})
    attn_implementation: ChoiceEnum(["sdpa", "eager", "flash_attention_2"]) = field(
        default="sdpa", metadata={"help": "attention kernel: PyTorch SDPA, eager, or flash-attn 2 when installed"})


class HFAutoModel(BaseFairseqModel):
    """A fairseq model holding one Hugging Face model as ``hf_model``.

    Subclasses set ``auto_class``. The model folder, ``trust_remote_code`` and the seed come from the
    task, which owns the tokenizer made from the same folder. ``forward`` returns logits.
    """

    auto_class = None

    def __init__(self, hf_model):
        super().__init__()
        self.hf_model = hf_model

    @classmethod
    def build_model(cls, cfg, task):
        hf_model = load_hf_model(
            cls.auto_class,
            task.cfg.hf_model_name_or_path,
            dtype=str(cfg.hf_dtype),
            attn_implementation=str(cfg.attn_implementation),
            trust_remote_code=task.cfg.trust_remote_code,
            init_seed=task.cfg.seed,
        )
        return cls(hf_model)

    def max_positions(self):
        return getattr(self.hf_model.config, "max_position_embeddings", None)


@register_model("hf_auto_causal_lm", dataclass=HFAutoModelConfig)
class HFAutoCausalLM(HFAutoModel):
    """``AutoModelForCausalLM``: next-token logits of shape (B, T, vocab)."""

    auto_class = AutoModelForCausalLM

    def forward(self, input_ids, attention_mask=None):
        return self.hf_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
