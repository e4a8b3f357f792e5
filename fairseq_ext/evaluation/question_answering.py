"""Extractive QA quality: SQuAD exact match and token F1 of the best predicted span against the answers."""

import collections
import re
import string
from typing import List, Sequence

import torch

from ..data.layouts import get_layout
from ..data.question_answering import context_token_range, encode_question_context, read_qa_records
from .batches import model_device
from .metric import Metric

MAX_ANSWER_TOKENS = 30


def normalize(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def f1_score(prediction: str, answer: str) -> float:
    """Token-overlap F1 of two normalised answers."""
    predicted, gold = normalize(prediction).split(), normalize(answer).split()
    common = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
    if not common:
        return float(predicted == gold)
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def best_span(start_logits: torch.Tensor, end_logits: torch.Tensor, first: int, last: int) -> tuple:
    """(start, end) inside the context tokens [first, last], start <= end < start + MAX_ANSWER_TOKENS,
    maximising the sum of start and end logits."""
    scores = start_logits[first : last + 1, None] + end_logits[None, first : last + 1]
    length = scores.size(0)
    allowed = torch.ones(length, length, dtype=torch.bool).triu().tril(MAX_ANSWER_TOKENS - 1)
    flat = scores.masked_fill(~allowed, float("-inf")).argmax()
    return first + int(flat // length), first + int(flat % length)


@torch.no_grad()
def predict_answers(model, tokenizer, records: Sequence[dict], max_length: int, batch_size: int = 32) -> List[str]:
    """The context text of the best span for each record's question."""
    device, answers = model_device(model), []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        encoded = [encode_question_context(tokenizer, r["question"], r["context"], max_length) for r in chunk]
        rows = [
            {
                "id": i,
                "start_positions": torch.tensor(0),
                "end_positions": torch.tensor(0),
                **{k: torch.tensor(e[k]) for k in ("input_ids", "token_type_ids") if k in e},
            }
            for i, e in enumerate(encoded)
        ]
        inputs = get_layout("qa").collate(rows, pad_id)["net_input"]  # padded exactly as in training
        logits = model(**{k: v.to(device) for k, v in inputs.items()}).float().cpu()
        for row, (record, e) in enumerate(zip(chunk, encoded)):
            first, last = context_token_range(e)
            begin, end = best_span(logits[row, :, 0], logits[row, :, 1], first, last)
            answers.append(record["context"][e["offset_mapping"][begin][0] : e["offset_mapping"][end][1]])
    return answers


def evaluate_question_answering(model, task, split: str) -> List[Metric]:
    """Exact match and F1 (best over each record's answers) on ``split``, every record counted."""
    records = read_qa_records(task.cfg.data, task.cfg.dataset_name, split)
    predictions = predict_answers(model, task.tokenizer, records, task.cfg.sequence_length)
    exact = sum(max(normalize(p) == normalize(a) for a in r["answers"]["text"]) for p, r in zip(predictions, records))
    f1 = sum(max(f1_score(p, a) for a in r["answers"]["text"]) for p, r in zip(predictions, records))
    examples = [
        f"{r['question']} -> {p!r} (expected {r['answers']['text'][0]!r})" for r, p in zip(records, predictions)
    ]
    return [
        Metric("exact match", exact / len(records), exact, len(records), examples=examples),
        Metric("F1", f1 / len(records)),
    ]
