"""Inputs of run.sh for the speed benchmarks: a config-only model folder and a random-token dataset."""

import shutil
from pathlib import Path

from speed_baseline import baseline_lengths
from speed_processes import REPO

TINY_LLAMA = REPO / "cube_examples" / "finetune_hf_model" / "model" / "tiny-llama"


def write_model_folder(folder: Path, shape: dict, seq: int) -> Path:
    """A LlamaConfig with ``shape`` (untied, no cache) and the shipped tiny tokenizer (used for its pad/eos
    ids only); no weight files, so fairseq_ext initialises the model from the config under the seed."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    config = dict(shape, max_position_embeddings=max(shape["max_position_embeddings"], seq))
    LlamaConfig(**config, tie_word_embeddings=False, use_cache=False).save_pretrained(folder)
    for file in TINY_LLAMA.iterdir():
        if file.is_file() and file.name != "config.json":
            shutil.copy(file, folder / file.name)
    return folder


def write_dataset(
    folder: Path, vocab: int, seq: int, train_rows: int, valid_rows: int = 4, seed: int = 0, kind: str = "fixed"
) -> Path:
    """A save_to_disk DatasetDict with one column ``input_ids``: rows of ids uniform in [3, vocab) (0-2 are the
    tokenizer's pad/bos/eos), of exactly ``seq`` ids (``fixed``), of lengths uniform in [seq/8, seq]
    (``varlen``) or long-tailed as chat data (``chat``): the lengths of the baseline's ``sample_lengths``.
    The ``disk`` type trains on all tokens when there is no labels column."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(seed)
    sample_lengths = baseline_lengths().sample_lengths

    def rows_of(count):
        return [rng.integers(3, vocab, size=n).tolist() for n in sample_lengths(kind, count, seq, rng)]

    splits = {
        split: datasets.Dataset.from_dict({"input_ids": rows_of(rows)})
        for split, rows in (("train", train_rows), ("valid", valid_rows))
    }
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder
