"""Generation quality of instruction-tuned language models (causal or encoder-decoder): exact match."""

import os
import re
from typing import Dict, List, Sequence

import torch

from ..data.instruction import encode_prompt, read_instruction_records
from ..data.prompts import get_prompt_template
from ..data.records import split_path
from .metric import Metric, ratio


def normalize_answer(text: str) -> str:
    """Compare answers up to surrounding and repeated whitespace."""
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def generate_answers(hf_model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
                     batch_size: int = 32) -> List[str]:
    """Greedy-decode an answer for each prompt (tokenized exactly as in training), stopping at EOS.

    A decoder-only model continues the prompt; an encoder-decoder model encodes it and decodes the answer.
    """
    hf_model.eval()
    device = next(hf_model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoder_decoder = hf_model.config.is_encoder_decoder
    answers = []
    for start in range(0, len(prompts), batch_size):
        encoded = [encode_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)  # left padded for generation
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        out = hf_model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
        answers += tokenizer.batch_decode(out if encoder_decoder else out[:, width:], skip_special_tokens=True)
    return answers


def exact_match(hf_model, tokenizer, records: Sequence[Dict], prompt_type: str, **generate_kwargs) -> Metric:
    """Exact match of greedy answers against the records' ``output``; ``examples`` shows the first answers."""
    template = get_prompt_template(prompt_type)
    prompts = [template.render(r["instruction"], r.get("input", "")) for r in records]
    predictions = generate_answers(hf_model, tokenizer, prompts, **generate_kwargs)
    correct = sum(normalize_answer(p) == normalize_answer(r["output"]) for p, r in zip(predictions, records))
    examples = [f"{r['instruction']} {r.get('input', '')!r} -> {p.strip()!r} (expected {r['output']!r})"
                for r, p in zip(records, predictions)]
    return ratio("exact match", correct, len(records), examples=examples)


def evaluate_generation(model, task, split: str) -> List[Metric]:
    """Exact match on ``split`` where it is a file of instruction records (``{data}/{dataset_name}_{split}.json``),
    for models that wrap a Hugging Face model (which generates); other data has no reference answers here."""
    if not (hasattr(model, "hf_model") and os.path.isfile(split_path(task.cfg.data, task.cfg.dataset_name, split))):
        return []
    records = read_instruction_records(task.cfg.data, task.cfg.dataset_name, split)
    return [exact_match(model.hf_model, task.tokenizer, records, task.cfg.prompt_type)]
