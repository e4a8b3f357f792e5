"""The ``hf_finetune`` task: tokenizer, datasets and batches for finetuning Hugging Face models."""

import logging
from dataclasses import dataclass, field

from fairseq.tasks import FairseqTask, register_task
from omegaconf import II

from ..cube.config import CubeConfig
from ..data.registry import get_dataset_builder
from ..data.tokenized import TokenizedDataset, to_hf_dataset, truncate
from ..errors import UserInputError
from ..models.hf_loading import load_tokenizer

logger = logging.getLogger(__name__)

CRITERION_FOR_ARCH = {"hf_auto_causal_lm": "hf_causal_lm"}


@dataclass
class HFFinetuneConfig(CubeConfig):
    data: str = field(default="", metadata={
        "help": "DATA_DIR holding {dataset_name}_{train,valid,test}.json (instruction), or a save_to_disk "
                "folder (disk)"})
    hf_model_name_or_path: str = field(default="", metadata={
        "help": "Hugging Face model folder, or a hub id already in the local cache (runs are offline)"})
    dataset_type: str = field(default="instruction", metadata={
        "help": "dataset builder: instruction, disk, or one registered with register_dataset_type"})
    dataset_name: str = field(default="toy_instructions", metadata={
        "help": "instruction data files are {data}/{dataset_name}_{split}.json"})
    prompt_type: str = field(default="plain", metadata={
        "help": "prompt template for instruction records: alpaca, plain, or one registered by the user"})
    sequence_length: int = field(default=512, metadata={
        "help": "samples longer than this are truncated (counted and reported per split)"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "allow code shipped with the model or tokenizer to run; off unless you trust its source"})
    seed: int = II("common.seed")


@register_task("hf_finetune", dataclass=HFFinetuneConfig)
class HFFinetuneTask(FairseqTask):
    """Finetune a Hugging Face model on tokenized samples from a registered dataset type."""

    def __init__(self, cfg: HFFinetuneConfig, tokenizer):
        super().__init__(cfg)
        self.tokenizer = tokenizer
        self._arch = None

    @classmethod
    def setup_task(cls, cfg: HFFinetuneConfig, **kwargs):
        if cfg.sequence_length <= 0:
            raise UserInputError(f"SEQUENCE_LENGTH must be a positive integer, got {cfg.sequence_length}")
        get_dataset_builder(cfg.dataset_type)  # an unknown type fails before the model is loaded
        return cls(cfg, load_tokenizer(cfg.hf_model_name_or_path, cfg.trust_remote_code))

    @property
    def pad_id(self) -> int:
        if self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id  # padded positions are masked, any id will do

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        builder = get_dataset_builder(self.cfg.dataset_type)
        samples = to_hf_dataset(builder(self.cfg, split, self.tokenizer))
        samples = truncate(samples, self.cfg.sequence_length, split)
        self.datasets[split] = TokenizedDataset(samples, self.pad_id, shuffle=(split == "train"))

    def build_criterion(self, cfg, from_checkpoint=False):
        """Use the arch's own loss when the criterion is fairseq's default (cross_entropy needs dictionaries)."""
        if cfg._name == "cross_entropy":
            if self._arch not in CRITERION_FOR_ARCH:
                raise UserInputError(f"--criterion cross_entropy does not work with hf_finetune; choose a criterion "
                                     f"for --arch {self._arch}")
            name = CRITERION_FOR_ARCH[self._arch]
            logger.info(f"criterion: {name} (the loss of --arch {self._arch})")
            cfg = name  # fairseq builds a criterion from its registered name with its default settings
        return super().build_criterion(cfg, from_checkpoint)

    def build_model(self, cfg, from_checkpoint=False):
        self._arch = cfg._name
        return super().build_model(cfg, from_checkpoint)

    def max_positions(self):
        return self.cfg.sequence_length

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None
