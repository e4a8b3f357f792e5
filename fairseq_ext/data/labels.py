"""Class label sets read from the data: names (strings) or ids (non-negative integers)."""

from dataclasses import dataclass
from typing import Dict, Iterable, List, Union

from ..errors import UserInputError

Label = Union[str, int]


@dataclass(frozen=True)
class LabelSet:
    """The classes of a dataset: ``names[i]`` is the name of class index ``i``."""

    names: List[str]
    by_value: Dict[Label, int]

    def index(self, value: Label) -> int:
        return self.by_value[value]

    @property
    def id2label(self) -> Dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> Dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}


def label_set(values_by_split: Dict[str, Iterable[Label]], what: str = "label") -> LabelSet:
    """The label set of the train split; other splits may only use labels train has.

    String labels become classes in sorted order; integer labels are class ids themselves
    (``num_labels`` = largest id + 1). Mixing the two, negative ids, or a label in valid/test that
    train lacks is a UserInputError.
    """
    seen = {split: set(values) for split, values in values_by_split.items()}
    train = seen["train"]
    for split, values in seen.items():
        unknown = values - train
        if unknown:
            raise UserInputError(
                f"the {what} sets of the splits disagree: split {split} has {what}s {sorted(map(str, unknown))[:10]} "
                f"that train does not have (train has {sorted(map(str, train))[:20]}); fix the data so every "
                f"{what} of {split} occurs in train"
            )
    all_values = set().union(*seen.values())
    if all(isinstance(v, str) for v in all_values):
        names = sorted(train)
        return LabelSet(names, {name: i for i, name in enumerate(names)})
    if all(isinstance(v, int) and not isinstance(v, bool) for v in all_values):
        if min(all_values) < 0:
            raise UserInputError(f"{what} ids must be non-negative integers, got {min(all_values)}")
        num = max(all_values) + 1
        return LabelSet([str(i) for i in range(num)], {i: i for i in range(num)})
    raise UserInputError(f"{what}s must be all strings (names) or all integers (ids), got a mix")
