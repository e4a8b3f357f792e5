"""toy_qa: extractive questions over a few fact sentences about people, in SQuAD format.

Record: ``{"id", "context", "question", "answers": {"text": [str], "answer_start": [int]}}`` with
``context[answer_start:answer_start + len(text)] == text``. A context holds 2-4 facts about one or two people
("Maria lives in Oslo. Maria works at Delta Labs. Tom was born in Lima."); the question asks for the place or
organisation of one fact ("Where does Maria live?") or for its person ("Who works at Delta Labs?"). Within a
context people, places and organisations are distinct, so every answer is unique; the answer span of a
person is the mention in the fact asked about. Names, places and organisations of valid/test come from
their split's part of the pools.
"""

import random

from .common import SPLIT_SIZES, SPLITS, make_unique
from .vocab import ORG_SUFFIXES, POOLS, cities, org_roots

DATASET_NAME = "toy_qa"
# relation: (fact sentence, question for the object, question for the person, object kind)
RELATIONS = {
    "lives": ("{person} lives in {obj}.", "Where does {person} live?", "Who lives in {obj}?", "place"),
    "works": ("{person} works at {obj}.", "Where does {person} work?", "Who works at {obj}?", "org"),
    "born": ("{person} was born in {obj}.", "Where was {person} born?", "Who was born in {obj}?", "place"),
}


def facts(rng: random.Random, split: str) -> list:
    """2-4 ``(person, relation, obj)`` facts about one or two people; at most one fact per (person, relation)
    and no place or organisation twice."""
    people = rng.sample(POOLS[split]["first_names"], rng.choice([1, 2, 2]))
    slots = [(person, relation) for person in people for relation in RELATIONS]
    chosen = rng.sample(slots, min(len(slots), rng.randint(2, 4)))
    places = rng.sample(cities(split), len(chosen))
    orgs = [f"{root} {rng.choice(ORG_SUFFIXES)}" for root in rng.sample(org_roots(split), len(chosen))]
    return [
        (person, relation, places[i] if RELATIONS[relation][3] == "place" else orgs[i])
        for i, (person, relation) in enumerate(chosen)
    ]


def qa_record(rng: random.Random, split: str) -> dict:
    """Context, question and answer span, the offsets taken while the context is assembled."""
    sentences, spans = [], []
    offset = 0
    for person, relation, obj in facts(rng, split):
        sentence = RELATIONS[relation][0].format(person=person, obj=obj)
        spans.append((person, relation, obj, offset, offset + sentence.index(obj)))  # person leads the sentence
        sentences.append(sentence)
        offset += len(sentence) + 1  # the joining space
    person, relation, obj, person_start, obj_start = rng.choice(spans)
    _, ask_object, ask_person, _ = RELATIONS[relation]
    if rng.random() < 0.5:
        question, answer, start = ask_object.format(person=person), obj, obj_start
    else:
        question, answer, start = ask_person.format(obj=obj), person, person_start
    return {
        "context": " ".join(sentences),
        "question": question,
        "answers": {"text": [answer], "answer_start": [start]},
    }


def make_splits(seed: int = 3) -> dict:
    """``{split: records}``, distinct (context, question) within a split, ids ``{split}-{index:04d}``."""
    rng = random.Random(seed)
    splits = {}
    for split in SPLITS:

        def make(rng, split=split):
            record = qa_record(rng, split)
            return (record["context"], record["question"]), record

        records = make_unique(rng, make, SPLIT_SIZES[split], set())
        splits[split] = [{"id": f"{split}-{i:04d}", **record} for i, record in enumerate(records)]
    return splits
