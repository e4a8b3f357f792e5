"""The ``hf_finetune`` task: tokenizer, datasets and batches for finetuning Hugging Face models."""

import logging
from dataclasses import dataclass, field
from typing import List

import torch
from fairseq.data import data_utils
from fairseq.models import ARCH_MODEL_REGISTRY
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II

from ..cube.config import CubeConfig
from ..cube.runtime.float8 import MIN_WIDTH as FLOAT8_MIN_WIDTH
from ..cube.runtime.float8 import RECIPES as FLOAT8_RECIPES
from ..cube.runtime.precision import autocast, check_precision
from ..data.global_batches import GlobalBatchIterator, token_budget_global_batches
from ..data.layouts import get_layout
from ..data.packing import pack
from ..data.preprocess import cache_key, cache_root, cached_split
from ..data.registry import get_dataset_builder, get_label_reader
from ..data.tokenized import TokenizedDataset, report_truncation, to_hf_dataset, truncate
from ..errors import UserInputError
from ..models.hf_loading import load_tokenizer
from ..optim.low_bit import OPTIMIZER_STATES, PRECISION_STATES, check_states

logger = logging.getLogger(__name__)


@dataclass
class HFFinetuneConfig(CubeConfig):
    data: str = field(
        default="",
        metadata={
            "help": "DATA_DIR holding {dataset_name}_{train,valid,test}.json (instruction), or a save_to_disk "
            "folder (disk)"
        },
    )
    hf_model_name_or_path: str = field(
        default="",
        metadata={"help": "Hugging Face model folder, or a hub id already in the local cache (runs are offline)"},
    )
    dataset_type: str = field(
        default="instruction",
        metadata={"help": "dataset builder: instruction, disk, or one registered with register_dataset_type"},
    )
    dataset_name: str = field(
        default="toy_instructions", metadata={"help": "instruction data files are {data}/{dataset_name}_{split}.json"}
    )
    prompt_type: str = field(
        default="plain",
        metadata={"help": "prompt template for instruction records: alpaca, plain, or one registered by the user"},
    )
    chat_template: str = field(
        default="",
        metadata={
            "help": "chat data: empty for the tokenizer's own chat_template (chatml when it has none), chatml, or the "
            "path of a Jinja chat template file"
        },
    )
    train_on_all_turns: bool = field(
        default=False,
        metadata={"help": "chat data: train on every token of the conversation, not only on the assistant's turns"},
    )
    data_cache_dir: str = field(
        default="",
        metadata={
            "help": "where tokenized splits are cached (default $FAIRSEQ_EXT_DATA_CACHE or ~/.cache/fairseq_ext/data)"
        },
    )
    sequence_length: int = field(
        default=512, metadata={"help": "samples longer than this are truncated (counted and reported per split)"}
    )
    precision: str = field(
        default="fp32",
        metadata={
            "help": "fp32; bf16: forward under bfloat16 autocast with fp32 weights and optimizer; bf16-master: bf16 "
            "weights, fp32 master weights and moments in the optimizer; bf16-lean: bf16 weights and moments; "
            "fp8: bf16-master with the decoder blocks' linear layers in float8 (GPUs of compute capability 8.9+, "
            "torchao); fp8-lean: bf16-lean with those float8 layers (all need --optimizer torch_adamw). fairseq's own --bf16 does not work on GPUs; fp16 is "
            "fairseq's --fp16"
        },
    )
    optimizer_states: str = field(
        default=PRECISION_STATES,
        metadata={
            "help": f"Adam's moments ({', '.join(OPTIMIZER_STATES)}): precision keeps them as --precision does; "
            "8bit / 4bit quantizes them block-wise with torchao's low-bit AdamW (--optimizer torch_adamw, one "
            "process, --precision bf16-lean, fp8-lean or fp32; torchao installed)"
        },
    )
    float8_recipe: str = field(
        default=FLOAT8_RECIPES[0],
        metadata={
            "help": "PRECISION=fp8 / fp8-lean: torchao's float8 scaling: tensorwise (per-tensor scales); "
            "tensorwise-fast-accum (also fast, less precise accumulation in the backward's matmuls)"
        },
    )
    float8_min_width: int = field(
        default=FLOAT8_MIN_WIDTH,
        metadata={"help": "PRECISION=fp8 / fp8-lean: linear layers at most this wide in and out stay bf16"},
    )
    pack_sequences: bool = field(
        default=False,
        metadata={
            "help": "causal LM: pack several samples into each row of up to --sequence-length tokens, each attending "
            "only to itself (no compute on padding)"
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "causal LM: each batch of unpacked samples as one row of their tokens end to end, each attending "
            "only to itself (no compute on padding)"
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "allow code shipped with the model or tokenizer to run; off unless you trust its source"},
    )
    seed: int = II("common.seed")
    fp16: bool = II("common.fp16")
    bf16: bool = II("common.bf16")
    cpu: bool = II("common.cpu")
    update_freq: List[int] = II("optimization.update_freq")


def sample_device(sample) -> torch.device:
    return sample["net_input"]["input_ids"].device


def check_token_budget(dataset, max_tokens, sequence_length: int) -> None:
    """A batch of at most ``max_tokens`` tokens (MAX_TOKENS) must hold the longest sample after truncation."""
    sizes = getattr(dataset, "sizes", None)
    if not max_tokens or sizes is None or not len(sizes):
        return
    longest = int(max(sizes))
    if longest > max_tokens:
        raise UserInputError(
            f"MAX_TOKENS {max_tokens} is smaller than the longest sample after truncation to SEQUENCE_LENGTH "
            f"{sequence_length} ({longest} tokens); set MAX_TOKENS to at least {longest} (or lower SEQUENCE_LENGTH)"
        )


@register_task("hf_finetune", dataclass=HFFinetuneConfig)
class HFFinetuneTask(FairseqTask):
    """Finetune a Hugging Face model on tokenized samples from a registered dataset type.

    The model's head decides how samples are batched (its ``layout``) and which criterion is the
    default; class labels, where the dataset type has them, are read once here and size the head.
    """

    def __init__(self, cfg: HFFinetuneConfig, tokenizer, label_set=None):
        super().__init__(cfg)
        self.tokenizer = tokenizer
        self.label_set = label_set
        self._arch = None
        self.layout = None

    @classmethod
    def setup_task(cls, cfg: HFFinetuneConfig, **kwargs):
        if cfg.sequence_length <= 0:
            raise UserInputError(f"SEQUENCE_LENGTH must be a positive integer, got {cfg.sequence_length}")
        check_precision(cfg.precision, fp16=cfg.fp16, bf16=cfg.bf16)
        check_states(cfg.optimizer_states)
        get_dataset_builder(cfg.dataset_type)  # an unknown type fails before the model is loaded
        reader = get_label_reader(cfg.dataset_type)
        label_set = reader(cfg) if reader else None
        if label_set is not None:
            logger.info(f"labels ({len(label_set.names)}): {', '.join(label_set.names[:20])}")
        return cls(cfg, load_tokenizer(cfg.hf_model_name_or_path, cfg.trust_remote_code), label_set)

    @property
    def pad_id(self) -> int:
        if self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id  # padded positions are masked, any id will do

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        if self.layout is None:
            raise RuntimeError("build the model (or call select_arch) before loading data: the head sets the layout")
        if self.cfg.pack_sequences and self.layout.name != "causal_lm":
            raise UserInputError(
                f"PACK_SEQUENCES=1 packs causal LM samples; the {self.layout.name} head of "
                f"--arch {self._arch} takes one sample per row: set PACK_SEQUENCES=0"
            )
        if self.cfg.padding_free and self.layout.name != "causal_lm":
            raise UserInputError(
                f"PADDING_FREE=1 lays causal LM samples end to end; the {self.layout.name} head of "
                f"--arch {self._arch} takes one sample per row: set PADDING_FREE=0"
            )
        builder = get_dataset_builder(self.cfg.dataset_type)

        def build():
            stats = {}
            samples = to_hf_dataset(builder(self.cfg, split, self.tokenizer), self.layout)
            samples = truncate(samples, self.layout, self.cfg.sequence_length, split, stats)
            if self.cfg.pack_sequences:
                samples = pack(samples, self.cfg.sequence_length, split)
            return samples, stats

        key = cache_key(self.cfg, split, self.tokenizer, self.layout.name, builder)
        samples, stats, from_cache = cached_split(key, cache_root(self.cfg), build)
        if from_cache:
            report_truncation(split, self.cfg.sequence_length, stats["samples"], stats["truncated"], stats["dropped"])
        self.datasets[split] = TokenizedDataset(
            samples, self.layout, self.pad_id, shuffle=(split == "train"), padding_free=self.cfg.padding_free
        )

    def get_batch_iterator(
        self,
        dataset,
        max_tokens=None,
        max_sentences=None,
        max_positions=None,
        ignore_invalid_inputs=False,
        required_batch_size_multiple=1,
        seed=1,
        num_shards=1,
        shard_id=0,
        num_workers=0,
        epoch=1,
        data_buffer_size=0,
        disable_iterator_cache=False,
        skip_remainder_batch=False,
        grouped_shuffling=False,
        update_epoch_batch_itr=False,
    ):
        """Training batches of ``--batch-size`` samples or ``--max-tokens`` tokens come as global batches
        (``data/global_batches.py``): the samples of each update, and a checkpoint's position, are the same
        under every plan with the same global batch. Other iterators (validation) are fairseq's."""
        check_token_budget(dataset, max_tokens, self.cfg.sequence_length)
        if dataset is not self.datasets.get("train") or not (max_tokens or max_sentences):
            return super().get_batch_iterator(
                dataset,
                max_tokens=max_tokens,
                max_sentences=max_sentences,
                max_positions=max_positions,
                ignore_invalid_inputs=ignore_invalid_inputs,
                required_batch_size_multiple=required_batch_size_multiple,
                seed=seed,
                num_shards=num_shards,
                shard_id=shard_id,
                num_workers=num_workers,
                epoch=epoch,
                data_buffer_size=data_buffer_size,
                disable_iterator_cache=disable_iterator_cache,
                skip_remainder_batch=skip_remainder_batch,
                grouped_shuffling=grouped_shuffling,
                update_epoch_batch_itr=update_epoch_batch_itr,
            )
        reuse = not disable_iterator_cache and not update_epoch_batch_itr and self.can_reuse_epoch_itr(dataset)
        if reuse and dataset in self.dataset_to_epoch_iter:
            return self.dataset_to_epoch_iter[dataset]
        dataset.set_epoch(epoch)
        # A run that never stops builds this iterator once, in epoch 1, and reuses it: a run resumed in a
        # later epoch must cut the same batches, so a reused iterator's sample order is epoch 1's.
        with data_utils.numpy_seed(seed + (1 if reuse else epoch)):
            indices = dataset.ordered_indices()
        if max_positions is not None:
            indices = self.filter_indices_by_size(indices, dataset, max_positions, ignore_invalid_inputs)
        accumulation = self.cfg.update_freq[0]
        if max_tokens:
            global_batches = token_budget_global_batches(
                indices, dataset.sizes, max_tokens, num_shards * accumulation, max_sentences
            )
        else:
            global_batches = dataset.batch_by_size(indices, max_sentences=max_sentences * num_shards * accumulation)
        epoch_iter = GlobalBatchIterator(
            units=num_shards,
            unit=shard_id,
            accumulation=accumulation,
            micro_batch=None if max_tokens else max_sentences,
            dataset=dataset,
            collate_fn=dataset.collater,
            batch_sampler=global_batches,
            seed=seed,
            num_workers=num_workers,
            epoch=epoch,
            buffer_size=data_buffer_size,
            skip_remainder_batch=skip_remainder_batch,
        )
        if reuse:
            self.dataset_to_epoch_iter[dataset] = epoch_iter
        return epoch_iter

    def build_criterion(self, cfg, from_checkpoint=False):
        """Use the arch's own loss when the criterion is fairseq's default (cross_entropy needs dictionaries)."""
        if cfg._name == "cross_entropy":
            name = getattr(ARCH_MODEL_REGISTRY.get(self._arch), "default_criterion", None)
            if name is None:
                raise UserInputError(
                    f"--criterion cross_entropy does not work with hf_finetune; choose a criterion "
                    f"for --arch {self._arch}"
                )
            logger.info(f"criterion: {name} (the loss of --arch {self._arch})")
            cfg = name  # fairseq builds a criterion from its registered name with its default settings
        return super().build_criterion(cfg, from_checkpoint)

    def select_arch(self, arch: str) -> None:
        """Batch samples for the head of ``arch`` (its ``layout``) and default to its criterion.
        ``build_model`` calls it; call it yourself to load data without building a model."""
        self._arch = arch
        self.layout = get_layout(getattr(ARCH_MODEL_REGISTRY.get(arch), "layout", "causal_lm"))

    def build_model(self, cfg, from_checkpoint=False):
        self.select_arch(cfg._name)
        model = super().build_model(cfg, from_checkpoint)
        limit = model.max_positions() if hasattr(model, "max_positions") else None
        if isinstance(limit, int) and self.cfg.sequence_length > limit:
            raise UserInputError(
                f"SEQUENCE_LENGTH {self.cfg.sequence_length} exceeds the model's "
                f"max_position_embeddings {limit}; set SEQUENCE_LENGTH to at most {limit}"
            )
        return model

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        """fairseq's step with the forward under the runtime's precision (``--precision``) or fairseq's ``--amp``."""
        model.train()  # fairseq's trainer did it already: HFAutoModel.train returns at once then
        model.set_num_updates(update_num)
        fairseq_amp = isinstance(optimizer, AMPOptimizer)
        with torch.autocast("cuda", enabled=fairseq_amp), autocast(self.cfg.precision, sample_device(sample)):
            loss, sample_size, logging_output = criterion(model, sample)
        if ignore_grad:
            loss *= 0
        optimizer.backward(loss)
        return loss, sample_size, logging_output

    def valid_step(self, sample, model, criterion):
        model.eval()
        with torch.no_grad(), autocast(self.cfg.precision, sample_device(sample)):
            return criterion(model, sample)

    def max_positions(self):
        return self.cfg.sequence_length

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None
