"""toy_sentiment: short product reviews labelled negative / neutral / positive.

Record: ``{"text": str, "label": str}``. Sentiment is carried by a shared lexicon of adjectives, verbs and
phrases (with a few negations, "is not great" being negative); the reviewed thing (an optional brand and a
product noun) comes from the split's own part of the pools, so valid/test reviews are about products and
brands never seen in training. Labels are balanced: they cycle through LABELS before the split is shuffled.
"""

import random

from .common import SPLIT_SIZES, SPLITS, make_unique
from .vocab import POOLS

DATASET_NAME = "toy_sentiment"
LABELS = ("negative", "neutral", "positive")

ADJECTIVES = {
    "positive": "great excellent wonderful fantastic superb brilliant lovely reliable sturdy comfortable "
    "delightful impressive perfect amazing outstanding".split(),
    "negative": "terrible awful horrible flimsy useless disappointing poor dreadful unreliable uncomfortable "
    "faulty overpriced shoddy".split(),
    "neutral": "okay average ordinary fine acceptable standard adequate typical unremarkable".split(),
}
VERBS = {
    "positive": ["love", "adore", "recommend", "really enjoy", "would buy again"],
    "negative": ["hate", "regret buying", "dislike", "returned", "cannot stand"],
    "neutral": ["bought", "received", "own", "use", "ordered"],
}
PHRASES = {
    "positive": [
        "works perfectly",
        "exceeded my expectations",
        "is worth every penny",
        "made my day",
        "is a joy to use",
        "is the best purchase I made this year",
    ],
    "negative": [
        "stopped working after a week",
        "broke on the first day",
        "is a waste of money",
        "let me down",
        "fell apart quickly",
        "is the worst purchase I made this year",
    ],
    "neutral": [
        "arrived on Tuesday",
        "does what it says",
        "came in a brown box",
        "is as described",
        "is neither good nor bad",
        "is about what I expected",
    ],
}
INTENSIFIERS = ["", "", "really ", "very ", "quite "]
TEMPLATES = (
    "The {item} is {intensifier}{adjective}.",
    "My new {item} is {intensifier}{adjective}.",
    "Honestly, the {item} is {intensifier}{adjective}.",
    "I {verb} this {item}.",
    "We {verb} the {item}.",
    "This {item} {phrase}.",
    "The {item} I got last month {phrase}.",
)


def item(rng: random.Random, split: str) -> str:
    """The reviewed thing: a product noun of ``split``, with a brand of ``split`` half of the time."""
    product = rng.choice(POOLS[split]["products"])
    return f"{rng.choice(POOLS[split]['brands'])} {product}" if rng.random() < 0.5 else product


def review(rng: random.Random, split: str, label: str) -> str:
    """One review sentence carrying ``label``; a sixth of the negative ones negate a positive adjective."""
    thing = item(rng, split)
    if label == "negative" and rng.random() < 1 / 6:
        return f"The {thing} is not {rng.choice(ADJECTIVES['positive'])}."
    return rng.choice(TEMPLATES).format(
        item=thing,
        intensifier=rng.choice(INTENSIFIERS) if label != "neutral" else "",
        adjective=rng.choice(ADJECTIVES[label]),
        verb=rng.choice(VERBS[label]),
        phrase=rng.choice(PHRASES[label]),
    )


def labelled_reviews(rng: random.Random, split: str, label: str, size: int, seen: set) -> list:
    """``size`` distinct ``{"text", "label"}`` records of one label."""

    def make(rng):
        text = review(rng, split, label)
        return text, {"text": text, "label": label}

    return make_unique(rng, make, size, seen)


def make_splits(seed: int = 1) -> dict:
    """``{split: records}``: distinct texts, label counts equal to within one, shuffled."""
    rng = random.Random(seed)
    splits = {}
    for split in SPLITS:
        size, seen, records = SPLIT_SIZES[split], set(), []
        for i, label in enumerate(LABELS):
            records += labelled_reviews(rng, split, label, size // len(LABELS) + (i < size % len(LABELS)), seen)
        rng.shuffle(records)
        splits[split] = records
    return splits
