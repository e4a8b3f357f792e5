"""The ``text_pairs`` dataset type: pairs of texts that belong together, for sentence embeddings.

Files: ``{data}/{dataset_name}_{split}.json`` whose records hold ``text`` and ``text_pair``
(strings), e.g. a sentence and its paraphrase, or a question and its answer, and optionally ``group``
(an integer or string): records of one group are batched together, so each is a hard negative of the
others. Each text is encoded on its own; a contrastive criterion treats the other pairs of the batch
as negatives.
"""

from typing import Dict, List

from .records import read_split, require_fields, split_path
from .registry import register_dataset_type

FIELDS = {"text": str, "text_pair": str}


def read_text_pairs(data_dir: str, dataset_name: str, split: str) -> List[Dict]:
    """Read and check the text pairs of one split."""
    return read_split(data_dir, dataset_name, split, FIELDS)


@register_dataset_type("text_pairs")
def build_text_pairs_split(cfg, split: str, tokenizer) -> List[Dict]:
    """Builder for ``DATASET_TYPE=text_pairs``: ``input_ids`` and ``pair_input_ids``."""
    records = read_text_pairs(cfg.data, cfg.dataset_name, split)
    texts = tokenizer([r["text"] for r in records])["input_ids"]
    pairs = tokenizer([r["text_pair"] for r in records])["input_ids"]
    samples = [{"input_ids": list(a), "pair_input_ids": list(b)} for a, b in zip(texts, pairs)]
    if any("group" in r for r in records):
        require_fields(records, {"group": (int, str)}, split_path(cfg.data, cfg.dataset_name, split))
        numbers = {g: i for i, g in enumerate(dict.fromkeys(str(r["group"]) for r in records))}
        for sample, record in zip(samples, records):
            sample["group"] = numbers[str(record["group"])]
    return samples
