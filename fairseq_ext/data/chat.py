"""The ``chat`` dataset type: conversations rendered with the model's chat template, loss on the assistant's turns.

Records (any file format of ``sources.py``) hold either

- ``messages``: a list of ``{"role": "system" | "user" | "assistant", "content": str}`` (OpenAI style), or
- ``conversations``: a list of ``{"from": "system" | "human" | "user" | "gpt" | "assistant", "value": str}``
  (ShareGPT style), with an optional top-level ``system`` string that becomes the first turn.

Each conversation is rendered with the chat template (``chat_templates.py``) and tokenized without adding
special tokens (the template writes them), as ``apply_chat_template`` does. Labels keep the tokens the
assistant wrote (its words and the template's end-of-turn text after them); every other token is -100, or
every token is trained on with ``--train-on-all-turns``. The assistant's tokens come from the template's
``{% generation %}`` markers where it has them; otherwise each assistant turn ``i`` is found by rendering
the conversation up to ``i`` (with the generation prompt) and up to and including ``i``, tokenizing both
and comparing their token ids with those of the whole conversation: the tokens past the first and within
the second are the assistant's (a token that straddles a boundary counts as the assistant's).
"""

from typing import Dict, List, Sequence, Tuple

import datasets

from ..errors import UserInputError
from .chat_templates import ChatTemplate, resolve_chat_template
from .layouts import IGNORE_INDEX
from .preprocess import token_features, tokenize_map
from .registry import register_dataset_type
from .sources import load_split_records


class BadRecord(ValueError):
    """What is wrong with one record (the caller adds the file and record number)."""


ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
}


def conversation(record: Dict) -> List[Dict[str, str]]:
    """The record's turns as ``[{"role", "content"}]`` with roles system/user/assistant.

    Raises:
        BadRecord: saying what is wrong with the record (the caller adds the file and record number).
    """
    if record.get("messages") is not None:
        turns, role_key, content_key, style = record["messages"], "role", "content", "messages"
    elif record.get("conversations") is not None:
        turns, role_key, content_key, style = record["conversations"], "from", "value", "conversations"
    else:
        raise BadRecord("record has neither 'messages' (role/content) nor 'conversations' (from/value)")
    if not isinstance(turns, (list, tuple)) or not turns:
        raise BadRecord(f"{style!r} must be a non-empty list of turns")
    out = []
    system = record.get("system")
    if style == "conversations" and system:
        out.append({"role": "system", "content": system})
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or turn.get(role_key) is None:
            raise BadRecord(f"turn {number} of {style!r} has no {role_key!r}")
        role = ROLES.get(str(turn[role_key]).lower())
        if role is None:
            raise BadRecord(f"turn {number} has unknown {role_key} {turn[role_key]!r}; known: {', '.join(ROLES)}")
        content = turn.get(content_key)
        if not isinstance(content, str) or not content.strip():
            raise BadRecord(f"turn {number} ({role}) has an empty or missing {content_key!r}")
        if role == "system" and out:
            raise BadRecord(f"turn {number} is a system turn; only the first turn may be one")
        out.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in out):
        raise BadRecord("the conversation has no assistant turn to learn from")
    return out


def prompt_and_answer(turns: Sequence[Dict[str, str]]) -> Tuple[List[Dict[str, str]], str]:
    """The turns before the last assistant turn, and that turn's words (what generation must reproduce)."""
    last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
    return list(turns[:last]), turns[last]["content"]


def render(tokenizer, template: ChatTemplate, turns, add_generation_prompt: bool = False):
    """Text of one conversation (or a list of them) under ``template``."""
    if not turns:
        return ""
    return tokenizer.apply_chat_template(
        turns, chat_template=template.text, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def assistant_spans(tokenizer, template: ChatTemplate, turns) -> Tuple[List[int], List[Tuple[int, int]]]:
    """Token ids of the conversation and the ``[start, end)`` token spans of its assistant turns, found by
    rendering prefixes turn by turn (see the module docstring)."""
    full = render(tokenizer, template, turns)
    texts = [full]
    for i, turn in enumerate(turns):
        if turn["role"] == "assistant":
            before, through = render(tokenizer, template, turns[:i], True), render(tokenizer, template, turns[: i + 1])
            if not (full.startswith(before) and full.startswith(through)):
                raise BadRecord(
                    f"the chat template ({template.source}) renders turn {i + 1} differently when more "
                    "turns follow, so its tokens cannot be told apart; use a template with "
                    "{% generation %} markers (CHAT_TEMPLATE=path/to/template.jinja)"
                )
            texts += [before, through]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    full_ids, spans = list(ids[0]), []
    for before, through in zip(ids[1::2], ids[2::2]):
        start = _common_prefix(before, full_ids)
        end = _common_prefix(through, full_ids)
        end = end if end == len(through) else end + 1  # the token across the boundary holds assistant text
        spans.append((start, max(start, end)))
    return full_ids, spans


def tokenize_conversation(tokenizer, template: ChatTemplate, turns, train_on_all_turns: bool = False) -> Dict:
    """``input_ids`` and ``labels`` of one conversation (labels: the assistant's tokens, or all of them)."""
    if template.has_generation_markers:
        out = tokenizer.apply_chat_template(
            turns, chat_template=template.text, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    else:
        ids, spans = assistant_spans(tokenizer, template, turns)
        mask = [0] * len(ids)
        for start, end in spans:
            mask[start:end] = [1] * (end - start)
    labels = list(ids) if train_on_all_turns else [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    return {"input_ids": ids, "labels": labels}


def tokenize_chat_batch(
    batch: Dict[str, list], indices: List[int], tokenizer, template: ChatTemplate, train_on_all_turns: bool, where: str
) -> Dict[str, list]:
    """``datasets.map`` function: the conversations of a batch of records, errors naming file and record."""
    out = {"input_ids": [], "labels": []}
    columns = [c for c in ("messages", "conversations", "system") if c in batch]
    for row, index in enumerate(indices):
        record = {c: batch[c][row] for c in columns}
        try:
            sample = tokenize_conversation(tokenizer, template, conversation(record), train_on_all_turns)
        except Exception as err:  # noqa: BLE001 -- a bad record or a template that raises: one line naming it
            what = (
                ""
                if isinstance(err, BadRecord)
                else f"the chat template ({template.source}) raised {type(err).__name__}: "
            )
            raise UserInputError(f"{where}: record {index + 1}: {what}{err}") from None
        out["input_ids"].append(sample["input_ids"])
        out["labels"].append(sample["labels"])
    return out


def chat_columns(records: datasets.Dataset, where: str) -> None:
    """Records need a ``messages`` or ``conversations`` column."""
    if not {"messages", "conversations"} & set(records.column_names):
        raise UserInputError(
            f"{where}: record 1: record has neither 'messages' (role/content) nor 'conversations' "
            f"(from/value); it has {', '.join(records.column_names)}"
        )


def read_chat_records(cfg, split: str) -> Tuple[datasets.Dataset, str]:
    """The raw records of ``split`` and the name of their file for messages."""
    records, source = load_split_records(cfg.data, cfg.dataset_name, split, {})
    chat_columns(records, source.describe())
    return records, source.describe()


@register_dataset_type("chat")
def build_chat_split(cfg, split: str, tokenizer) -> datasets.Dataset:
    """Builder for ``DATASET_TYPE=chat``."""
    template = resolve_chat_template(getattr(cfg, "chat_template", ""), tokenizer)
    records, where = read_chat_records(cfg, split)
    return tokenize_map(
        records,
        tokenize_chat_batch,
        desc=f"chat template on {split}",
        with_indices=True,
        features=token_features(),
        fn_kwargs={
            "tokenizer": tokenizer,
            "template": template,
            "where": where,
            "train_on_all_turns": bool(getattr(cfg, "train_on_all_turns", False)),
        },
    )
