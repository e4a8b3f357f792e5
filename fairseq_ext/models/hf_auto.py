"""fairseq models around Hugging Face ``AutoModelFor*`` classes."""

import logging
from dataclasses import dataclass, field

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from transformers import AutoModelForCausalLM

from ..cube.runtime.recompute import apply_recompute, parse_module_names, state_dict_name
from .hf_loading import DTYPES, load_hf_model
from .lora import apply_lora, is_lora

logger = logging.getLogger(__name__)


@dataclass
class HFAutoModelConfig(FairseqDataclass):
    hf_dtype: ChoiceEnum(list(DTYPES)) = field(
        default="float32", metadata={"help": "dtype the Hugging Face weights are loaded in"})
    attn_implementation: ChoiceEnum(["sdpa", "eager", "flash_attention_2"]) = field(
        default="sdpa", metadata={"help": "attention kernel: PyTorch SDPA, eager, or flash-attn 2 when installed"})
    recompute_module_names: str = field(default="", metadata={
        "help": "module class names (comma separated) whose forward is recomputed in backward to save memory, "
                "e.g. LlamaDecoderLayer"})
    use_lora: bool = field(default=False, metadata={"help": "train LoRA adapters (PEFT) instead of all weights"})
    lora_config: str = field(default="", metadata={
        "help": "peft.LoraConfig keys as JSON or 'key=value ...' (e.g. 'r=16 lora_alpha=32 "
                "target_modules=q_proj,v_proj'); unset keys take PEFT's defaults"})


class HFAutoModel(BaseFairseqModel):
    """A fairseq model holding one Hugging Face model as ``hf_model``.

    Subclasses set ``auto_class`` and ``peft_task_type``. The model folder, ``trust_remote_code`` and
    the seed come from the task, which owns the tokenizer made from the same folder. ``forward``
    returns logits. With LoRA, ``state_dict`` holds only the trainable weights (checkpoints stay
    small) and ``load_state_dict`` accepts exactly those: the frozen weights come from the model folder.
    """

    auto_class = None
    peft_task_type = None

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
        num_recomputed = apply_recompute(hf_model, parse_module_names(cfg.recompute_module_names))
        if num_recomputed:
            logger.info(f"recompute: {num_recomputed} modules ({cfg.recompute_module_names}) recompute their forward")
        if cfg.use_lora:
            hf_model = apply_lora(hf_model, cfg.lora_config, cls.peft_task_type)
            trainable = sum(p.numel() for p in hf_model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in hf_model.parameters())
            logger.info(f"LoRA: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
        return cls(hf_model)

    @property
    def saves_trainable_only(self) -> bool:
        return is_lora(self.hf_model)

    def _trainable_keys(self, prefix: str = "") -> set:
        return {prefix + state_dict_name(name) for name, p in self.named_parameters() if p.requires_grad}

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        full = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if not self.saves_trainable_only:
            return full
        keep = self._trainable_keys(prefix)
        for key in [k for k in full if k not in keep]:
            del full[key]
        return full

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        if not self.saves_trainable_only:
            return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)
        expected, given = self._trainable_keys(), set(state_dict)
        if strict and expected != given:
            raise RuntimeError(f"LoRA checkpoint does not match the model: missing {sorted(expected - given)[:5]}, "
                               f"unexpected {sorted(given - expected)[:5]}")
        return super().load_state_dict(state_dict, strict=False, model_cfg=model_cfg, args=args)

    def max_positions(self):
        return getattr(self.hf_model.config, "max_position_embeddings", None)


@register_model("hf_auto_causal_lm", dataclass=HFAutoModelConfig)
class HFAutoCausalLM(HFAutoModel):
    """``AutoModelForCausalLM``: next-token logits of shape (B, T, vocab)."""

    auto_class = AutoModelForCausalLM
    peft_task_type = "CAUSAL_LM"

    def forward(self, input_ids, attention_mask=None):
        return self.hf_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
