"""toy_pairs: sentence pairs stating one relation between two people from each side.

Record: ``{"text": str, "text_pair": str, "group": int}``: ``text`` states a relation ("Anna is taller than Ben."),
``text_pair`` the same fact from the other person's side ("Ben is shorter than Anna."). Records come in
adjacent twins with the roles swapped ("Ben is taller than Anna." / "Anna is shorter than Ben."), so for
every text a pair with exactly the same words but the wrong meaning is in the same split: bag-of-words
similarity cannot decide, which is why a pretrained paraphrase embedder does not already solve it. Twins
share a ``group``, which the ``text_pairs`` loader keeps in one batch (each is the other's hard negative). Each
(relation, two people) occurs once per split; names of valid/test come from their split's part of the pools.
"""

import random

from .common import SPLIT_SIZES, SPLITS
from .vocab import POOLS

DATASET_NAME = "toy_pairs"
OBJECTS = ["a book", "a letter", "a ticket", "a gift", "an umbrella", "a map", "a camera", "a guitar"]
# relation: (text template, text_pair template). {x} is the subject of the text, {y} the other person;
# {obj} is one of OBJECTS, the same on both sides and in both twins.
RELATIONS = {
    "taller": ("{x} is taller than {y}.", "{y} is shorter than {x}."),
    "older": ("{x} is older than {y}.", "{y} is younger than {x}."),
    "faster": ("{x} is faster than {y}.", "{y} is slower than {x}."),
    "heavier": ("{x} is heavier than {y}.", "{y} is lighter than {x}."),
    "gave": ("{x} gave {obj} to {y}.", "{y} received {obj} from {x}."),
    "sold": ("{x} sold {obj} to {y}.", "{y} bought {obj} from {x}."),
    "lent": ("{x} lent {obj} to {y}.", "{y} borrowed {obj} from {x}."),
    "left": ("{x} is left of {y}.", "{y} is right of {x}."),
    "behind": ("{x} sits behind {y}.", "{y} sits in front of {x}."),
    "above": ("{x} lives above {y}.", "{y} lives below {x}."),
    "follows": ("{x} follows {y}.", "{y} is followed by {x}."),
    "parent": ("{x} is the parent of {y}.", "{y} is the child of {x}."),
    "teaches": ("{x} teaches {y}.", "{y} is taught by {x}."),
    "hired": ("{x} hired {y}.", "{y} was hired by {x}."),
    "beat": ("{x} beat {y} at chess.", "{y} lost to {x} at chess."),
    "called": ("{x} called {y} yesterday.", "{y} got a call from {x} yesterday."),
}


def twins(rng: random.Random, relation: str, first: str, second: str, group: int) -> list:
    """The two records of one relation between two people: one per direction, in random order."""
    text, text_pair = RELATIONS[relation]
    obj = rng.choice(OBJECTS)
    records = [
        {"text": text.format(x=x, y=y, obj=obj), "text_pair": text_pair.format(x=x, y=y, obj=obj), "group": group}
        for x, y in ((first, second), (second, first))
    ]
    rng.shuffle(records)
    return records


def split_records(rng: random.Random, split: str) -> list:
    """``SPLIT_SIZES[split]`` records, twin by twin, each (relation, unordered pair of people) once."""
    names, seen, records = POOLS[split]["first_names"], set(), []
    while len(records) < SPLIT_SIZES[split]:
        relation = rng.choice(sorted(RELATIONS))
        first, second = rng.sample(names, 2)
        key = (relation, frozenset((first, second)))
        if key not in seen:
            seen.add(key)
            records += twins(rng, relation, first, second, len(records) // 2)
    assert len(records) == SPLIT_SIZES[split], "split sizes must be even: records come in twins"
    return records


def make_splits(seed: int = 4) -> dict:
    """``{split: records}``; records ``2k`` and ``2k+1`` are role-swapped twins."""
    rng = random.Random(seed)
    return {split: split_records(rng, split) for split in SPLITS}
