"""toy_ner: templated sentences with people, places and organisations, BIO-tagged per word.

Record: ``{"tokens": [word, ...], "tags": [tag, ...]}`` of equal length; tags are TAGS (BIO over PER, LOC,
ORG). People are "First" or "First Last", organisations "Root Suffix" ("Acme Corp", "Blue River Bank"),
places one or two words ("Oslo", "New York"), so multi-word entities give I- tags. Punctuation is its own
token. Sentence-initial capitalised words ("Yesterday", "The") are O, so capitalisation alone does not
decide. Valid/test entities come from their split's part of the pools: no entity word of valid or test
occurs in train, except the shared organisation suffixes (vocab.ORG_SUFFIXES).
"""

import random

from .common import SPLIT_SIZES, SPLITS, make_unique
from .vocab import ORG_SUFFIXES, POOLS, cities, org_roots

DATASET_NAME = "toy_ner"
ENTITY_TYPES = ("PER", "LOC", "ORG")
TAGS = ("O",) + tuple(f"{bio}-{kind}" for kind in ENTITY_TYPES for bio in "BI")

TEMPLATES = (
    "{PER} visited {LOC} with {PER} .",
    "{PER} works for {ORG} in {LOC} .",
    "{ORG} opened a new office in {LOC} .",
    "Yesterday , {PER} met {PER} at the {ORG} headquarters .",
    "{PER} moved from {LOC} to {LOC} last year .",
    "The {ORG} team hired {PER} .",
    "{PER} said that {ORG} will expand to {LOC} .",
    "In {LOC} , {PER} founded {ORG} .",
    "{PER} and {PER} flew to {LOC} on Monday .",
    "{ORG} signed a deal with {ORG} .",
    "We met {PER} near the station in {LOC} .",
    "{PER} bought shares of {ORG} .",
    "The weather in {LOC} was cold , so {PER} stayed home .",
    "According to {PER} , {ORG} is hiring .",
)


def entity(rng: random.Random, split: str, kind: str) -> str:
    """A random entity of ``kind`` built from ``split``'s pools."""
    if kind == "PER":
        first = rng.choice(POOLS[split]["first_names"])
        return f"{first} {rng.choice(POOLS[split]['last_names'])}" if rng.random() < 0.5 else first
    if kind == "LOC":
        return rng.choice(cities(split))
    return f"{rng.choice(org_roots(split))} {rng.choice(ORG_SUFFIXES)}"


def tagged_sentence(rng: random.Random, split: str) -> tuple:
    """``(tokens, tags)`` of one filled template; the entities of one sentence are distinct."""
    tokens, tags, used = [], [], set()
    for word in rng.choice(TEMPLATES).split():
        kind = word[1:-1] if word[1:-1] in ENTITY_TYPES else None
        if kind is None:
            tokens.append(word)
            tags.append("O")
            continue
        name = entity(rng, split, kind)
        while name in used:
            name = entity(rng, split, kind)
        used.add(name)
        words = name.split()
        tokens += words
        tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
    return tokens, tags


def make_splits(seed: int = 2) -> dict:
    """``{split: records}`` with distinct token sequences within each split."""
    rng = random.Random(seed)

    def make_for(split):
        def make(rng):
            tokens, tags = tagged_sentence(rng, split)
            return tuple(tokens), {"tokens": tokens, "tags": tags}

        return make

    return {split: make_unique(rng, make_for(split), SPLIT_SIZES[split], set()) for split in SPLITS}
