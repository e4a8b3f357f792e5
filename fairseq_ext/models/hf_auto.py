"""fairseq models around Hugging Face ``AutoModelFor*`` classes."""

import logging
from dataclasses import dataclass, field

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from ..cube.runtime.precision import weight_dtype
from ..cube.runtime.recompute import apply_recompute, parse_module_names, state_dict_name
from ..errors import UserInputError
from .document_attention import ATTENTION_NAME, document_kwargs
from .hf_loading import DTYPES, init_device, load_hf_model
from .lora import apply_lora, is_lora

logger = logging.getLogger(__name__)

# Config fields of families whose causal LM rescales the LM head's logits (no fused loss for them).
LOGIT_RESCALING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass
class HFAutoModelConfig(FairseqDataclass):
    hf_dtype: ChoiceEnum(list(DTYPES)) = field(
        default="float32", metadata={"help": "dtype the Hugging Face weights are loaded in"}
    )
    attn_implementation: ChoiceEnum(["sdpa", "eager", "flash_attention_2", ATTENTION_NAME]) = field(
        default="sdpa",
        metadata={
            "help": "attention kernel: PyTorch SDPA, eager, flash-attn 2 when installed, or document_varlen (packed "
            "rows attend inside their documents through a variable-length kernel; what sdpa means with "
            "--pack-sequences)"
        },
    )
    recompute_module_names: str = field(
        default="",
        metadata={
            "help": "module class names (comma separated) whose forward is recomputed in backward to save memory, "
            "e.g. LlamaDecoderLayer"
        },
    )
    use_lora: bool = field(default=False, metadata={"help": "train LoRA adapters (PEFT) instead of all weights"})
    compile_layers: bool = field(
        default=False,
        metadata={
            "help": "torch.compile each decoder layer (the model's _no_split_modules classes): fused kernels, "
            "one compilation shared by all layers"
        },
    )
    lm_loss_logits: bool = field(
        default=False,
        metadata={
            "help": "causal LM: compute the loss from full (batch, length, vocab) logits as Hugging Face does, "
            "instead of applying the LM head chunk by chunk inside the loss"
        },
    )
    lora_config: str = field(
        default="",
        metadata={
            "help": "peft.LoraConfig keys as JSON or 'key=value ...' (e.g. 'r=16 lora_alpha=32 "
            "target_modules=q_proj,v_proj'); unset keys take PEFT's defaults"
        },
    )


def attention_implementation(cfg, task) -> str:
    """``--attn-implementation``, except that packed rows (``--pack-sequences``) and padding-free batches
    (``--padding-free``) under the default ``sdpa`` attend inside their documents through the variable-length
    kernel (``document_attention.py``)."""
    documents = getattr(task.cfg, "pack_sequences", False) or getattr(task.cfg, "padding_free", False)
    if str(cfg.attn_implementation) == "sdpa" and documents:
        return ATTENTION_NAME
    return str(cfg.attn_implementation)


class HFAutoModel(BaseFairseqModel):
    """A fairseq model holding one Hugging Face model as ``hf_model``.

    Subclasses set ``auto_class``, ``peft_task_type``, the sample ``layout`` their batches follow
    (``data/layouts.py``), the ``default_criterion`` used when ``--criterion`` is left at fairseq's
    default, and ``needs_labels`` for heads whose size is the data's class count. The model folder,
    ``trust_remote_code``, the seed and the label set come from the task, which owns the tokenizer
    made from the same folder. ``forward`` returns the head's output tensor (``output``). With LoRA,
    ``state_dict`` holds only the trainable weights (checkpoints stay small) and ``load_state_dict``
    accepts exactly those: the frozen weights come from the model folder.
    """

    auto_class = None
    peft_task_type = None
    layout = "causal_lm"
    default_criterion = None
    needs_labels = False
    supports_pipeline = False  # the runtime's pipeline stages run this head (decoder-layer slices)

    def __init__(self, hf_model):
        super().__init__()
        self.hf_model = hf_model
        self.training = hf_model.training  # from_pretrained returns models in eval mode (see train())
        self.lm_loss_logits = False  # --lm-loss-logits

    @classmethod
    def label_config(cls, task) -> dict:
        """``num_labels``, ``id2label`` and ``label2id`` from the task's label set, for heads that need them."""
        if not cls.needs_labels:
            return {}
        labels = task.label_set
        if labels is None:
            raise UserInputError(
                f"this model head needs class labels, and DATASET_TYPE {task.cfg.dataset_type!r} "
                "has none; use classification / token_classification data, or register your "
                "dataset type with labels="
            )
        return {"num_labels": len(labels.names), "id2label": labels.id2label, "label2id": labels.label2id}

    @classmethod
    def build_model(cls, cfg, task):
        bf16_weights = weight_dtype(task.cfg.precision)
        hf_model = load_hf_model(
            cls.auto_class,
            task.cfg.hf_model_name_or_path,
            dtype=bf16_weights or str(cfg.hf_dtype),
            init_device=init_device(task.cfg),
            attn_implementation=attention_implementation(cfg, task),
            trust_remote_code=task.cfg.trust_remote_code,
            init_seed=task.cfg.seed,
            **cls.label_config(task),
        )
        num_recomputed = apply_recompute(hf_model, parse_module_names(cfg.recompute_module_names))
        if num_recomputed:
            logger.info(f"recompute: {num_recomputed} modules ({cfg.recompute_module_names}) recompute their forward")
        if cfg.use_lora:
            hf_model = apply_lora(
                hf_model, cfg.lora_config, cls.peft_task_type, adapters_in_model_dtype=bf16_weights is not None
            )
            trainable = sum(p.numel() for p in hf_model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in hf_model.parameters())
            logger.info(f"LoRA: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
        model = cls(hf_model)
        model.lm_loss_logits = cfg.lm_loss_logits
        return model

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
            raise RuntimeError(
                f"LoRA checkpoint does not match the model: missing {sorted(expected - given)[:5]}, "
                f"unexpected {sorted(given - expected)[:5]}"
            )
        return super().load_state_dict(state_dict, strict=False, model_cfg=model_cfg, args=args)

    def max_positions(self):
        return getattr(self.hf_model.config, "max_position_embeddings", None)

    def set_num_updates(self, num_updates):
        """Replaces fairseq's walk over every submodule looking for ``set_num_updates`` (none of a Hugging
        Face model has one; the walk costs milliseconds per update for models with thousands of modules)."""
        self.num_updates = num_updates

    def train(self, mode: bool = True):
        """``nn.Module.train`` walks every submodule, and fairseq calls it at every update: a model already
        in ``mode`` is left as it is (switch a submodule alone with its own ``train``/``eval``)."""
        if mode == self.training:
            return self
        return super().train(mode)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if getattr(self.hf_model.config, "use_cache", None):
            # a key/value cache is for generation; a recomputed layer would append its keys to it twice
            inputs["use_cache"] = False
        return self.output(self.hf_model(**inputs))

    def output(self, hf_output):
        """The tensor the criterion reads from the Hugging Face model's output."""
        return hf_output.logits


@register_model("hf_auto_causal_lm", dataclass=HFAutoModelConfig)
class HFAutoCausalLM(HFAutoModel):
    """``AutoModelForCausalLM``: next-token logits of shape (B, T, vocab)."""

    auto_class = AutoModelForCausalLM
    peft_task_type = "CAUSAL_LM"
    default_criterion = "hf_causal_lm"
    supports_pipeline = True

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        document_lengths=None,
        max_document_length=None,
        features_only=False,
    ):
        """Next-token logits; with ``features_only`` the last hidden states (B, T, hidden) that the LM head
        reads, for a loss that applies the head itself (:meth:`fused_lm_head`). Packed rows come with
        ``position_ids`` (restarting per sample), no attention mask, and their ``document_lengths``, which
        the ``document_varlen`` attention attends within (other attention implementations build a
        block-diagonal mask from the positions)."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if document_lengths is not None and self._causal_lm().config._attn_implementation == ATTENTION_NAME:
            inputs.update(document_kwargs(document_lengths, max_document_length))
        if features_only:
            return self._causal_lm().base_model(**inputs).last_hidden_state
        return self.hf_model(**inputs).logits

    def _causal_lm(self):
        return self.hf_model.get_base_model() if is_lora(self.hf_model) else self.hf_model

    def fused_lm_head(self):
        """The LM head's weight (vocab, hidden) when logits are exactly ``hidden @ weight.T``, so that the loss
        may compute them chunk by chunk from the hidden states; None when the head has a bias, adapters
        or a tensor-parallel shard, the model rescales its logits (e.g. Gemma-2's soft-capping), or the run
        asks for full logits (``--lm-loss-logits``)."""
        causal_lm = self._causal_lm()
        if self.lm_loss_logits or any(
            getattr(causal_lm.config, name, None) not in (None, 1.0) for name in LOGIT_RESCALING
        ):
            return None
        head = causal_lm.get_output_embeddings()
        if type(head) is not torch.nn.Linear or head.bias is not None:
            return None
        weight = head.weight
        if type(weight) is torch.nn.Parameter or _data_parallel_shard(weight):
            return weight
        return None


def _data_parallel_shard(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is FSDP2's shard of a whole weight over data-parallel mesh dims only (no tensor-parallel
    split): FSDP2 gathers it for the forward, and the root keeps it gathered until the backward, so a loss after
    the forward reads the whole weight (``fused_lm_head`` asked again then)."""
    from torch.distributed.tensor import DTensor

    from ..cube.runtime.mesh import DATA_PARALLEL_AXES

    names = weight.device_mesh.mesh_dim_names if isinstance(weight, DTensor) else None
    return bool(names) and set(names) <= set(DATA_PARALLEL_AXES)


@register_model("hf_auto_seq2seq_lm", dataclass=HFAutoModelConfig)
class HFAutoSeq2SeqLM(HFAutoModel):
    """``AutoModelForSeq2SeqLM`` (T5, BART, ...): the prompt is encoded, the decoder is fed the labels shifted
    right (teacher forcing); logits of shape (B, T_labels, vocab), aligned with the labels."""

    auto_class = AutoModelForSeq2SeqLM
    peft_task_type = "SEQ_2_SEQ_LM"
    layout = "seq2seq_lm"
    default_criterion = "hf_seq2seq_lm"

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None):
        decoder_input_ids = self.hf_model.prepare_decoder_input_ids_from_labels(labels=labels)
        return self.hf_model(
            input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids, use_cache=False
        ).logits


@register_model("hf_auto_seq_cls_lm", dataclass=HFAutoModelConfig)
class HFAutoSequenceClassification(HFAutoModel):
    """``AutoModelForSequenceClassification``: class logits (B, num_labels); ``num_labels`` comes from the data."""

    auto_class = AutoModelForSequenceClassification
    peft_task_type = "SEQ_CLS"
    layout = "seq_cls"
    default_criterion = "hf_seq_cls"
    needs_labels = True


@register_model("hf_auto_token_cls_lm", dataclass=HFAutoModelConfig)
class HFAutoTokenClassification(HFAutoModel):
    """``AutoModelForTokenClassification``: per-token class logits (B, T, num_labels)."""

    auto_class = AutoModelForTokenClassification
    peft_task_type = "TOKEN_CLS"
    layout = "token_cls"
    default_criterion = "hf_token_cls"
    needs_labels = True


@register_model("hf_auto_qa_lm", dataclass=HFAutoModelConfig)
class HFAutoQuestionAnswering(HFAutoModel):
    """``AutoModelForQuestionAnswering``: answer start and end logits stacked as (B, T, 2)."""

    auto_class = AutoModelForQuestionAnswering
    peft_task_type = "QUESTION_ANS"
    layout = "qa"
    default_criterion = "hf_qa"

    def output(self, hf_output):
        return torch.stack([hf_output.start_logits, hf_output.end_logits], dim=-1)


@register_model("hf_auto_lm", dataclass=HFAutoModelConfig)
class HFAutoBase(HFAutoModel):
    """``AutoModel`` without a head: the last hidden states (B, T, hidden), for criteria that bring their own
    objective (the shipped one: ``hf_contrastive`` sentence embeddings on text pairs)."""

    auto_class = AutoModel
    peft_task_type = "FEATURE_EXTRACTION"
    layout = "embedding"
    default_criterion = "hf_contrastive"

    def output(self, hf_output):
        return hf_output.last_hidden_state
