"""The ``instruction`` dataset type: alpaca-style records, prompt tokens masked out of the loss.

Records (``{data}/{dataset_name}_{split}.json``, ``.jsonl``, ``.parquet`` or a ``save_to_disk`` folder; see
``sources.py``) hold ``instruction`` and ``output`` strings and an optional ``input`` string.
"""

from typing import Dict, List, Optional

import datasets
import numpy as np
import pyarrow as pa

from ..errors import UserInputError
from .encode import BatchEncoder, with_masked_prefix
from .layouts import IGNORE_INDEX
from .preprocess import token_features, tokenize_map
from .prompts import get_prompt_template
from .records import read_split, require_fields, split_path
from .registry import register_dataset_type
from .sources import load_split_records
from .word_ids import Rows, join_rows

FIELDS = {"instruction": str, "output": str}

__all__ = ["IGNORE_INDEX", "read_instruction_records", "tokenize_instruction", "tokenize_records"]


def read_instruction_records(data_dir: str, dataset_name: str, split: str) -> List[Dict]:
    """Read and validate the instruction records of one split; an empty split is a UserInputError."""
    records = read_split(data_dir, dataset_name, split, ["instruction", "output"])
    require_fields([r for r in records if "input" in r], ["input"], split_path(data_dir, dataset_name, split))
    return records


def encode_prompt(tokenizer, prompt: str) -> List[int]:
    """Token ids of a prompt as the model sees it at the start of a sample (BOS included, no EOS)."""
    ids = list(tokenizer(prompt)["input_ids"])
    eos = tokenizer.eos_token_id
    if ids and eos is not None and ids[-1] == eos and eos != tokenizer.bos_token_id:
        ids = ids[:-1]  # tokenizers like T5's append EOS to every text
    return ids


def tokenize_instruction(tokenizer, prompt: str, answer: str) -> Dict[str, List[int]]:
    """Token ids of prompt + answer + EOS, with labels that keep only the answer and EOS.

    The prompt and the answer are tokenized separately and concatenated, so the label mask falls
    exactly on the boundary whatever the tokenizer merges across it.
    """
    if tokenizer.eos_token_id is None:
        raise UserInputError("the tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
    prompt_ids = encode_prompt(tokenizer, prompt)
    answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
    }


def tokenize_records(records: List[Dict], tokenizer, prompt_type: str) -> List[Dict[str, List[int]]]:
    """Render each record with the ``prompt_type`` template and tokenize it."""
    template = get_prompt_template(prompt_type)
    return [
        tokenize_instruction(tokenizer, template.render(r["instruction"], r.get("input", "")), r["output"])
        for r in records
    ]


def tokenize_instruction_batch(
    batch: pa.Table, tokenizer, prompt_type: str, encode: Optional[BatchEncoder] = None
) -> pa.Table:
    """``datasets.map`` function over Arrow batches: :func:`tokenize_instruction` for every record, the prompts
    and the answers each tokenized in one call of ``encode`` (``encode.py``; made from ``tokenizer`` when not
    given), the samples made as Arrow columns."""
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if eos is None:
        raise UserInputError("the tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
    template = get_prompt_template(prompt_type)
    instructions = batch.column("instruction").to_pylist()
    inputs = batch.column("input").to_pylist() if "input" in batch.column_names else [None] * len(instructions)
    encode = encode or BatchEncoder(tokenizer)
    prompts = encode.rows([template.render(i, x or "") for i, x in zip(instructions, inputs)], True)
    answers = encode.rows(batch.column("output").to_pylist(), False)
    if eos != bos:  # tokenizers like T5's append EOS to every text
        nonempty = prompts.lengths > 0
        last = prompts.values[np.maximum(prompts.starts + prompts.lengths - 1, 0)] if len(prompts.values) else 0
        prompts.lengths = prompts.lengths - (nonempty & (last == eos))
    count = len(instructions)
    eos_rows = Rows(np.zeros(count, np.int64), np.ones(count, np.int64), np.asarray([eos], dtype=np.int32))
    input_ids = join_rows([prompts, answers, eos_rows])
    return pa.table({"input_ids": input_ids, "labels": with_masked_prefix(input_ids, prompts.lengths, IGNORE_INDEX)})


def tokenize_instruction_dataset(
    records: datasets.Dataset, tokenizer, prompt_type: str, split: str
) -> datasets.Dataset:
    """Samples of instruction records held in a Dataset (batched map over Arrow batches, Arrow files)."""
    return tokenize_map(
        records.with_format("arrow"),
        tokenize_instruction_batch,
        desc=f"tokenizing {split}",
        batch_size=4000,  # a quarter less work than 1,000: each distinct word of a batch is looked up once
        features=token_features(),
        fn_kwargs={"tokenizer": tokenizer, "prompt_type": prompt_type, "encode": BatchEncoder(tokenizer)},
    )


@register_dataset_type("instruction")
def build_instruction_split(cfg, split: str, tokenizer) -> datasets.Dataset:
    """Builder for ``DATASET_TYPE=instruction``."""
    records, _ = load_split_records(cfg.data, cfg.dataset_name, split, FIELDS, optional={"input": str})
    return tokenize_instruction_dataset(records, tokenizer, cfg.prompt_type, split)
