"""Relevance scorers: how relevant each visual token is to the task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from torch import Tensor

from vtprune.framework.hints import HINT_LAST_QUERY
from vtprune.framework.signals import Signals
from vtprune.framework.stages import RelevanceScorer

from .functional.prompt_relevance import PromptPool, prompt_cosine_scores
from .functional.seeded import row_uniform

__all__ = ["PromptCosine", "AttentionRelevance", "LastTokenAttention", "RandomRelevance", "NoRelevance", "HINT_LAST_QUERY"]



@dataclass(frozen=True, eq=False)
class PromptCosine(RelevanceScorer):
    """Cosine similarity of each visual token to the pooled prompt (ZSPAPrune)."""

    name: ClassVar[str] = "prompt_cosine"
    description: ClassVar[str] = "cosine similarity of each visual token to the pooled prompt embedding"
    requires: ClassVar[frozenset[str]] = frozenset({"prompt"})
    pool: PromptPool = "mean"

    def score(self, signals: Signals) -> Tensor:
        return prompt_cosine_scores(signals.visual, signals.prompt, signals.prompt_mask, self.pool)


@dataclass(frozen=True, eq=False)
class AttentionRelevance(RelevanceScorer):
    """Head-mean of the last prompt token's attention to each visual token (FastV's score)."""

    name: ClassVar[str] = "attention"
    description: ClassVar[str] = "mean over heads of the last prompt token's attention to each visual token"
    requires: ClassVar[frozenset[str]] = frozenset({"attention"})

    def score(self, signals: Signals) -> Tensor:
        return signals.attention.float().mean(dim=1)  # (B, N)


@dataclass(frozen=True, eq=False)
class LastTokenAttention(AttentionRelevance):
    """Head-mean of the sequence's last real token's attention to each visual token (HoliTom's inner-merge score,
    official ``attention[0, -1]``): ``relevance.attention`` with the adapter's query token moved to the last real
    token of each row (hint ``last_token_query``; with left or right padding, the row's last attention-mask-1
    token). Every drop of a pipeline containing it is scored from that token."""

    name: ClassVar[str] = "last_attention"
    description: ClassVar[str] = "mean over heads of the sequence's last real token's attention to each visual token"
    adapter_hints: ClassVar[frozenset[str]] = frozenset({HINT_LAST_QUERY})


@dataclass(frozen=True, eq=False)
class RandomRelevance(RelevanceScorer):
    """Seeded uniform random scores (a control for prompt-aware scoring)."""

    name: ClassVar[str] = "random"
    description: ClassVar[str] = "seeded uniform random scores, the same draw for a row alone or in a batch"
    stochastic: ClassVar[Optional[bool]] = True
    seed: int = 0

    def score(self, signals: Signals) -> Tensor:
        return row_uniform(signals.batch_size, signals.num_tokens, self.seed, signals.visual.device)


@dataclass(frozen=True, eq=False)
class NoRelevance(RelevanceScorer):
    """No scores: nothing is critical and the diversity stage fills the whole budget."""

    name: ClassVar[str] = "none"
    description: ClassVar[str] = "no scores: the diversity stage fills the whole budget"
    gives_scores: ClassVar[bool] = False

    def score(self, signals: Signals) -> Optional[Tensor]:
        return None
