"""Generation quality of instruction-tuned causal LMs: greedy answers and exact match."""

import re
from typing import Dict, List, Sequence

import torch

from .data.instruction import encode_prompt
from .data.prompts import get_prompt_template


def normalize_answer(text: str) -> str:
    """Compare answers up to surrounding and repeated whitespace."""
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def generate_answers(hf_model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
                     batch_size: int = 32) -> List[str]:
    """Greedy-decode an answer for each prompt (tokenized exactly as in training), stopping at EOS."""
    hf_model.eval()
    device = next(hf_model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
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
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return answers


def exact_match(hf_model, tokenizer, records: Sequence[Dict], prompt_type: str, **generate_kwargs) -> Dict:
    """Exact match of greedy answers against the records' ``output``.

    Returns:
        dict with ``exact_match`` (fraction), ``correct``, ``total`` and ``predictions``.
    """
    template = get_prompt_template(prompt_type)
    prompts = [template.render(r["instruction"], r.get("input", "")) for r in records]
    predictions = generate_answers(hf_model, tokenizer, prompts, **generate_kwargs)
    correct = sum(normalize_answer(p) == normalize_answer(r["output"]) for p, r in zip(predictions, records))
    return {"exact_match": correct / max(len(records), 1), "correct": correct, "total": len(records),
            "predictions": predictions}
