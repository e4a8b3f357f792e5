"""A metric value with the counts behind it, printed the same way by every evaluator."""

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class Metric:
    """``value`` is a fraction in [0, 1]; ``correct``/``total`` are given for count-based metrics."""

    name: str
    value: float
    correct: Optional[int] = None
    total: Optional[int] = None
    examples: List[str] = field(default_factory=list)

    def format(self, split: str, label: str = "") -> str:
        """e.g. ``test exact match (after): 171/200 = 85.5%``."""
        label = f" ({label})" if label else ""
        counts = f"{self.correct}/{self.total} = " if self.total is not None else ""
        return f"{split} {self.name}{label}: {counts}{100 * self.value:.1f}%"


def ratio(name: str, correct: int, total: int, **kwargs) -> Metric:
    """A count-based metric; an empty split gives 0."""
    return Metric(name, correct / total if total else 0.0, correct, total, **kwargs)
