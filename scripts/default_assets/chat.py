"""toy_chat: multi-turn conversations about a list of words, for ``DATASET_TYPE=chat``.

Record: ``{"messages": [{"role": ..., "content": ...}, ...]}``; a third of them open with a system turn. The user
gives a word list, the assistant counts it, then one or two questions about the list follow (first, second or
last word, a word repeated), each answered from the list of the first turn: the answers need the earlier
turns. The words are toy_instructions' (the shipped tokenizer knows them); valid and test word lists never
occur in train.
"""

import random

from .common import SPLIT_SIZES, SPLITS

DATASET_NAME = "toy_chat"
SYSTEM = "You answer questions about a list of words."
QUESTIONS = {
    "first": ("What is the first word?", lambda words: words[0]),
    "second": ("What is the second word?", lambda words: words[1]),
    "last": ("What is the last word?", lambda words: words[-1]),
    "repeat": ("Repeat the first word two times.", lambda words: f"{words[0]} {words[0]}"),
}


def conversation(rng: random.Random, words: list, number_words: list) -> dict:
    """One conversation over ``words``: the list, its count, then one or two questions."""
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 1 / 3 else []
    messages += [
        {"role": "user", "content": "Words: " + " ".join(words)},
        {"role": "assistant", "content": f"{number_words[len(words)]} words."},
    ]
    for kind in rng.sample(sorted(QUESTIONS), rng.randint(1, 2)):
        question, answer = QUESTIONS[kind]
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer(words)}]
    return {"messages": messages}


def make_splits(seed: int = 5) -> dict:
    """``{split: records}``; a word list of valid or test never occurs in train."""
    from scripts.build_default_assets import NUMBER_WORDS, WORDS  # the shipped tokenizer's words

    rng = random.Random(seed)
    splits, held_out = {}, set()
    for split in ("test", "valid", "train"):
        records = []
        while len(records) < SPLIT_SIZES[split]:
            words = rng.sample(WORDS, rng.randint(3, 5))
            if tuple(words) in held_out:
                continue
            if split != "train":
                held_out.add(tuple(words))
            records.append(conversation(rng, words, NUMBER_WORDS))
        splits[split] = records
    return {split: splits[split] for split in SPLITS}
