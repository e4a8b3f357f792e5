"""The ``question_answering`` dataset type: extractive QA in the SQuAD format.

Files: ``{data}/{dataset_name}_{split}.json`` whose records hold ``context``, ``question`` and
``answers``: ``{"text": [...], "answer_start": [...]}`` with character offsets into the context
(the first answer is trained on; all count in evaluation). The question and the context are encoded
as a pair, the context cut to SEQUENCE_LENGTH; the answer's character span becomes the start and end
token. A sample whose answer lies beyond the cut is dropped from training (and counted).
"""

from typing import Dict, List, Optional, Tuple

from ..errors import UserInputError
from .records import read_split, split_path
from .registry import register_dataset_type

FIELDS = {"context": str, "question": str, "answers": dict}


def check_answers(records: List[Dict], path: str) -> None:
    """Each answer's text is found in the context at its ``answer_start``."""
    for record in records:
        where = f"{path}: line {record.get('__line__', '?')}"
        answers = record["answers"]
        texts, starts = answers.get("text"), answers.get("answer_start")
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts) or not texts:
            raise UserInputError(
                f'{where}: answers must be {{"text": [...], "answer_start": [...]}} with as many '
                "starts as texts, and at least one answer"
            )
        for text, start in zip(texts, starts):
            if not isinstance(start, int) or record["context"][start : start + len(text)] != text:
                raise UserInputError(f"{where}: answer {text!r} is not in the context at answer_start {start}")


def read_qa_records(data_dir: str, dataset_name: str, split: str) -> List[Dict]:
    """Read and check the QA records of one split."""
    records = read_split(data_dir, dataset_name, split, FIELDS)
    check_answers(records, split_path(data_dir, dataset_name, split))
    return records


def encode_question_context(tokenizer, question: str, context: str, max_length: int):
    """The (question, context) pair, the context cut to ``max_length`` tokens, with character offsets."""
    return tokenizer(question, context, truncation="only_second", max_length=max_length, return_offsets_mapping=True)


def context_token_range(encoded) -> Tuple[int, int]:
    """First and last token index of the context in an encoded (question, context) pair."""
    positions = [i for i, sequence in enumerate(encoded.sequence_ids()) if sequence == 1]
    return positions[0], positions[-1]


def answer_token_span(encoded, answer_start: int, answer_end: int) -> Optional[Tuple[int, int]]:
    """Token indices (start, end) covering characters [answer_start, answer_end) of the context, or None when
    the answer was cut off."""
    first, last = context_token_range(encoded)
    offsets = encoded["offset_mapping"]
    if offsets[last][1] < answer_end:
        return None
    start = next(i for i in range(first, last + 1) if offsets[i][1] > answer_start)
    end = next(i for i in range(last, first - 1, -1) if offsets[i][0] < answer_end)
    return start, end


@register_dataset_type("question_answering")
def build_question_answering_split(cfg, split: str, tokenizer) -> List[Dict]:
    """Builder for ``DATASET_TYPE=question_answering``: ``input_ids`` and the answer's token span."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserInputError("question answering needs a fast tokenizer (character offsets); this model's is slow")
    samples = []
    for record in read_qa_records(cfg.data, cfg.dataset_name, split):
        encoded = encode_question_context(tokenizer, record["question"], record["context"], cfg.sequence_length)
        start_char = record["answers"]["answer_start"][0]
        span = answer_token_span(encoded, start_char, start_char + len(record["answers"]["text"][0]))
        sample = {
            "input_ids": list(encoded["input_ids"]),
            "start_positions": span[0] if span else -1,
            "end_positions": span[1] if span else -1,
        }
        if "token_type_ids" in encoded:
            sample["token_type_ids"] = list(encoded["token_type_ids"])
        samples.append(sample)
    return samples
