"""Test-split metrics of a fairseq_ext model, trained or as training starts: one evaluator per sample layout.

An evaluator is ``evaluate(model, task, split) -> [Metric, ...]`` (``model`` the fairseq model).
"""

from typing import Callable, Dict, List

from .classification import evaluate_sequence_classification, evaluate_token_classification
from .generation import evaluate_generation
from .metric import Metric
from .question_answering import evaluate_question_answering
from .retrieval import evaluate_retrieval

EVALUATORS: Dict[str, Callable] = {
    "causal_lm": evaluate_generation,
    "seq2seq_lm": evaluate_generation,
    "seq_cls": evaluate_sequence_classification,
    "token_cls": evaluate_token_classification,
    "qa": evaluate_question_answering,
    "embedding": evaluate_retrieval,
}


def evaluate(model, task, split: str = "test") -> List[Metric]:
    """The metrics of ``model`` on ``split`` for the layout of its head (empty when there is none)."""
    model.eval()
    return EVALUATORS[task.layout.name](model, task, split)
