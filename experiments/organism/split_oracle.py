"""Per-row outcome of every critical/diversity split on the organism (for tuning an automatic split).

Contract
--------
``split_outcomes(model, processor, samples, budget, recipe="zspaprune")`` prunes the organism to
``budget`` visual tokens with ``recipe + split(critical=c / budget)`` for every critical count
``c = 0 .. budget`` and answers every sample (greedy ``generate``, as ``evaluate.answer``). It returns
a `SplitOutcomes`: ``correct`` (S, budget + 1) bool, whether sample ``s`` is answered right with
``c`` critical tokens, and the pipeline's signals of each row as the allocator sees them:
``scores`` (S, N) relevance and ``visual`` (S, N, D) visual tokens. A rule that maps a row's signals
to a critical count ``c(s)`` then has accuracy ``mean(correct[s, c(s)])`` exactly, without rerunning
the model (the selection of a row depends on its own signals and ``c`` only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from vtprune.framework import compose
from vtprune.framework.prune import prune

from .evaluate import answer
from .task import Sample

__all__ = ["PROMPT_STOP", "SplitOutcomes", "chosen_critical_counts", "split_outcomes"]

PROMPT_STOP = " ASSISTANT:"  # the organism's user turn ends here (the prompt span for relevance)


@dataclass
class SplitOutcomes:
    """``correct`` (S, budget + 1) bool; ``scores`` (S, N) float; ``visual`` (S, N, D) float."""

    budget: int
    correct: np.ndarray
    scores: np.ndarray
    visual: np.ndarray


class _Recording:
    """A pipeline proxy that keeps the relevance scores and visual tokens of every row it selects for."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.scores: list[torch.Tensor] = []
        self.visual: list[torch.Tensor] = []
        self.chosen: list[torch.Tensor] = []  # (B,) critical counts of each select

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipeline, name)

    def select(self, signals: Any, budget: Any) -> Any:
        scores = self.pipeline.relevance.score(signals)  # (B, N) or None (no relevance stage)
        if scores is not None:
            self.scores.append(scores.float().cpu())
        self.visual.append(signals.visual.float().cpu())  # (B, N, D)
        selection = self.pipeline.select(signals, budget)
        self.chosen.append((selection.critical & selection.mask).sum(dim=1).cpu())  # (B,)
        return selection


def split_outcomes(
    model: Any, processor: Any, samples: Sequence[Sample], budget: int, recipe: str = "zspaprune",
    batch_size: int = 100,
) -> SplitOutcomes:
    """Answer ``samples`` at ``budget`` tokens with every critical count 0..budget (see module doc)."""
    if budget < 1:
        raise ValueError(f"budget must be a positive token count, got {budget}")
    stop = processor.tokenizer(PROMPT_STOP, add_special_tokens=False)["input_ids"]
    answers = np.array([s.answer for s in samples])
    correct = np.zeros((len(samples), budget + 1), dtype=bool)  # (S, C)
    scores = visual = None
    for c in range(budget + 1):
        pipe = _Recording(compose(f"{recipe}+split(critical={c / budget!r})"))
        with prune(model, pipe, budget=budget, prompt_stop=stop):
            preds = answer(model, processor, samples, batch_size=batch_size)
        correct[:, c] = np.array(preds) == answers
        if scores is None:
            scores = torch.cat(pipe.scores).numpy()  # (S, N)
            visual = torch.cat(pipe.visual).numpy()  # (S, N, D)
    return SplitOutcomes(budget=budget, correct=correct, scores=scores, visual=visual)


def chosen_critical_counts(
    model: Any, processor: Any, samples: Sequence[Sample], budget: int, recipe: str = "zspaprune_auto",
    batch_size: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """(critical count (S,) the pipeline chose per row, correct (S,) bool) for ``recipe`` at ``budget``."""
    stop = processor.tokenizer(PROMPT_STOP, add_special_tokens=False)["input_ids"]
    pipe = _Recording(compose(recipe))
    with prune(model, pipe, budget=budget, prompt_stop=stop):
        preds = answer(model, processor, samples, batch_size=batch_size)
    correct = np.array(preds) == np.array([s.answer for s in samples])
    return torch.cat(pipe.chosen).numpy(), correct
