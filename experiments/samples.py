"""Evaluation samples and answer scoring: the `Sample` record, the `Task` protocol and the answer
metrics (`normalize_answer`, `exact_match`, `vqa_accuracy`, `contains`, `primary_metric`).

A small module with no dependencies inside vtprune, imported by the tasks, the metrics and the
lmms-eval model alike (``vtprune.experiments.tasks`` re-exports every name).

>>> vqa_accuracy("Two", ["2", "two", "2", "3"])
1.0
>>> exact_match("the Red.", ["red"])
1.0
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Protocol, Sequence, runtime_checkable

__all__ = [
    "Sample",
    "Task",
    "METRICS",
    "normalize_answer",
    "exact_match",
    "vqa_accuracy",
    "contains",
    "primary_metric",
    "task_answer",
]


@dataclass
class Sample:
    """One evaluation item.

    Attributes:
        id: unique within the task (used to resume and to match the unpruned run).
        images: PIL images or (H, W, 3) uint8 arrays, in prompt order.
        question: the question text (without image placeholders).
        answers: reference answers (several for VQA-style scoring).
        meta: anything else (kept in the per-sample results).
        videos: decoded videos, each (T, H, W, 3) uint8 frames, put before the images in the prompt.
    """

    id: str
    images: list[Any]
    question: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    videos: list[Any] = field(default_factory=list)


@runtime_checkable
class Task(Protocol):
    def samples(self, limit: Optional[int] = None) -> Iterator[Sample]: ...

    def score(self, sample: Sample, prediction: str) -> dict[str, float]: ...


def task_answer(task: Any, sample: Sample, prediction: str) -> str:
    """The normalised answer ``task`` scores in ``prediction``: ``task.answer(sample, prediction)``
    (optional task hook, e.g. the first word) when the task has one, else the whole prediction,
    passed through `normalize_answer` either way. Fidelity compares these answers."""
    hook = getattr(task, "answer", None)
    text = hook(sample, prediction) if callable(hook) else prediction
    return normalize_answer(text)


# ------------------------------------------------------------------------------------------------
# Answer metrics
# ------------------------------------------------------------------------------------------------

_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, number words as digits, spaces collapsed."""
    words = _PUNCT.sub(" ", str(text).lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals a normalized answer."""
    guess = normalize_answer(prediction)
    return float(any(guess == normalize_answer(a) for a in answers))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy: min(#annotators agreeing / 3, 1) on normalized answers (a single reference
    answer counts as three annotators)."""
    if not answers:
        return 0.0
    guess = normalize_answer(prediction)
    agree = sum(guess == normalize_answer(a) for a in answers)
    return min(1.0, agree / (3.0 if len(answers) > 1 else 1.0))


def contains(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if a normalized answer occurs as whole words in the normalized prediction."""
    guess = f" {normalize_answer(prediction)} "
    return float(any(f" {normalize_answer(a)} " in guess for a in answers if normalize_answer(a)))


METRICS = {"exact_match": exact_match, "vqa": vqa_accuracy, "contains": contains}


def primary_metric(task: Any, scores: Mapping[str, float]) -> str:
    """The name of the task's accuracy metric among ``scores``."""
    name = getattr(task, "metric", None)
    return name if name in scores else next(iter(scores))
