"""Generation quality of instruction- and chat-tuned language models (causal or encoder-decoder): exact match."""

import re
from typing import Dict, List, Sequence, Union

import torch

from ..data.chat import BadRecord, conversation, prompt_and_answer, read_chat_records, render
from ..data.chat_templates import ChatTemplate, end_of_turn, resolve_chat_template
from ..data.instruction import FIELDS, encode_prompt
from ..data.prompts import get_prompt_template
from ..data.sources import find_split_source, load_source, load_split_records
from ..errors import UserInputError
from ..models.document_attention import masked_attention
from .metric import Metric, ratio


def normalize_answer(text: str) -> str:
    """Compare answers up to surrounding and repeated whitespace."""
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def generate_answers(
    hf_model,
    tokenizer,
    prompts: Sequence[Union[str, List[int]]],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    stop_text: str = "",
) -> List[str]:
    """Greedy-decode an answer for each prompt, stopping at EOS (and at ``stop_text``, cut from the answer).

    A prompt is a string (tokenized as instruction prompts are in training) or its token ids. A decoder-only
    model continues the prompt; an encoder-decoder model encodes it and decodes the answer.
    """
    hf_model.eval()
    device = next(hf_model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoder_decoder = hf_model.config.is_encoder_decoder
    stop = {"stop_strings": [stop_text], "tokenizer": tokenizer} if stop_text else {}
    answers = []
    for start in range(0, len(prompts), batch_size):
        encoded = [
            p if isinstance(p, list) else encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]
        ]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)  # left padded for generation
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        with masked_attention(hf_model):
            out = hf_model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad_id,
                **stop,
            )
        texts = tokenizer.batch_decode(out if encoder_decoder else out[:, width:], skip_special_tokens=True)
        answers += [text.split(stop_text)[0] if stop_text else text for text in texts]
    return answers


def exact_match(hf_model, tokenizer, records: Sequence[Dict], prompt_type: str, **generate_kwargs) -> Metric:
    """Exact match of greedy answers against the records' ``output``; ``examples`` shows the first answers."""
    template = get_prompt_template(prompt_type)
    prompts = [template.render(r["instruction"], r.get("input") or "") for r in records]
    predictions = generate_answers(hf_model, tokenizer, prompts, **generate_kwargs)
    correct = sum(normalize_answer(p) == normalize_answer(r["output"]) for p, r in zip(predictions, records))
    examples = [
        f"{r['instruction']} {r.get('input') or ''!r} -> {p.strip()!r} (expected {r['output']!r})"
        for r, p in zip(records, predictions)
    ]
    return ratio("exact match", correct, len(records), examples=examples)


def chat_exact_match(
    hf_model, tokenizer, conversations: Sequence[List[Dict[str, str]]], template: ChatTemplate, **generate_kwargs
) -> Metric:
    """Exact match of the greedy answer to each conversation's last assistant turn, given the turns before it
    rendered with ``template`` and its generation prompt (tokenized exactly as in training)."""
    pairs = [prompt_and_answer(turns) for turns in conversations]
    texts = [render(tokenizer, template, turns, add_generation_prompt=True) for turns, _ in pairs]
    prompts = [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    predictions = generate_answers(
        hf_model, tokenizer, prompts, stop_text=end_of_turn(tokenizer, template), **generate_kwargs
    )
    correct = sum(normalize_answer(p) == normalize_answer(answer) for p, (_, answer) in zip(predictions, pairs))
    examples = [
        f"{turns[-1]['content']!r} -> {p.strip()!r} (expected {answer!r})"
        for (turns, answer), p in zip(pairs, predictions)
    ]
    return ratio("exact match", correct, len(pairs), examples=examples)


def evaluate_generation(model, task, split: str) -> List[Metric]:
    """Exact match on ``split`` where it has records (any file format): conversations for ``DATASET_TYPE=chat``,
    instruction records otherwise, for models that wrap a Hugging Face model (which generates)."""
    cfg = task.cfg
    if not hasattr(model, "hf_model") or find_split_source(cfg.data, cfg.dataset_name, split) is None:
        return []
    if cfg.dataset_type == "chat":
        records, where = read_chat_records(cfg, split)
        conversations = []
        for index, record in enumerate(records):
            try:
                conversations.append(conversation(record))
            except BadRecord as err:
                raise UserInputError(f"{where}: record {index + 1}: {err}") from None
        template = resolve_chat_template(cfg.chat_template, task.tokenizer)
        return [chat_exact_match(model.hf_model, task.tokenizer, conversations, template)]
    source = find_split_source(cfg.data, cfg.dataset_name, split)
    if source.kind == "disk_dict" and not set(FIELDS) <= set(load_source(source).column_names):
        return []  # a save_to_disk folder of text or token ids: no reference answers
    records, _ = load_split_records(cfg.data, cfg.dataset_name, split, FIELDS, optional={"input": str})
    return [exact_match(model.hf_model, task.tokenizer, list(records), cfg.prompt_type)]
