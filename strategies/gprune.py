"""G-Prune's stages (docs/methods.md, "G-Prune"): thin wrappers over `functional.gprune`.

``relevance.gprune`` scores every visual token by information propagation on its image's similarity graph (one graph
per view where the adapter gives ``view_index``: LLaVA-NeXT's and LLaVA-OneVision's base image and high-resolution
crops, newlines kept);
``budget.gprune`` counts ``int(keep_ratio * n)`` (truncation) per view as the official ``topk`` does, plus the
newlines, all critical; the `gprune` preset keeps the top tokens with ``critical.topk_official`` at ``pre_llm`` (the
projector output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch
from torch import Tensor

from vtprune.framework.signals import Signals
from vtprune.framework.stages import Allocation, RelevanceScorer

from .budget import AllCriticalBudget
from .functional.gprune import gprune_scores, gprune_view_count

__all__ = ["GPruneRelevance", "GPruneBudget", "GPRUNE_STAGES"]


@dataclass(frozen=True, eq=False)
class GPruneRelevance(RelevanceScorer):
    """G-Prune's importance: token norms propagated ``iterations`` steps over the row's cosine graph (edges below
    ``similarity`` cut, softmax(sim / ``temperature``) transitions), divided by each token's degree. The defaults
    are the official ones (``llava_arch.py``: ``similarity = 0.5``, ``temperature = 0.03``, ``iterate_num = 5``).
    With ``view_index``, a row of several views (or with newlines, view -1) gets one graph per view and per-view rank
    keys (`functional.gprune.gprune_view_keys`): its top ``budget.gprune`` tokens are the official per-view sets."""

    name: ClassVar[str] = "gprune"
    description: ClassVar[str] = "G-Prune: norms propagated over the cosine graph (softmax(sim/t), cut below `similarity`) / degree"
    optional: ClassVar[frozenset[str]] = frozenset({"view_index"})
    similarity: float = 0.5
    temperature: float = 0.03
    iterations: int = 5

    def __post_init__(self) -> None:
        if not -1.0 <= self.similarity <= 1.0:
            raise ValueError(f"similarity must be a cosine in [-1, 1], got {self.similarity}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")

    def score(self, signals: Signals) -> Tensor:
        return gprune_scores(
            signals.visual, signals.visual_mask, self.similarity, self.temperature, self.iterations, signals.view_index
        )  # (B, N)


@dataclass(frozen=True, eq=False)
class GPruneBudget(AllCriticalBudget):
    """G-Prune's count, all critical (top-k). A fraction f keeps ``int(f * n_v)`` (truncation) of each view of the row
    (``view_index``; without it, or on a row of one view, the row is one view: ``int(f * n)``, at least one token)
    plus every token of no view (newlines), as the official ``topk(int(keep_ratio * n))`` per graph; an int K keeps K.

    Adaptive (``adaptive_counts``): the count needs the row's views, so :meth:`resolve` gives a fraction's bound (every
    real token) and :meth:`adapt` the count; a fraction of 1.0 (or an int at or above the row's tokens) keeps it whole.
    """

    name: ClassVar[str] = "gprune"
    description: ClassVar[str] = "G-Prune count: int(n_v*ratio) per view (truncation) + newlines for a fraction; every token critical"
    optional: ClassVar[frozenset[str]] = frozenset({"view_index"})
    adaptive_counts: ClassVar[bool] = True
    rounding: ClassVar[str] = "floor"

    def resolve(self, budget: int | float, valid_counts: Tensor) -> Tensor:
        if isinstance(budget, int):
            return super().resolve(budget, valid_counts)
        return valid_counts.clone()  # a fraction's bound: adapt counts per view

    def covers(self, budget: Any, totals: Tensor, valid_counts: Tensor) -> Optional[Tensor]:
        per_row = _per_row(budget, valid_counts.shape[0])
        whole = [b >= 1.0 if isinstance(b, float) else b >= int(v) for b, v in zip(per_row, valid_counts.tolist())]
        return torch.tensor(whole, dtype=torch.bool, device=totals.device)  # (B,)

    def adapt(self, signals: Signals, budget: Any, totals: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Allocation:
        counts = totals.clone()  # (B,): an int budget keeps its resolved count
        for b, row_budget in enumerate(_per_row(budget, totals.shape[0])):
            if isinstance(row_budget, float):
                views = signals.row_views(b, valid)
                sizes = [int(v.numel()) for v in views]
                count = gprune_view_count(row_budget, sizes, int(valid[b].sum()) - sum(sizes))
                counts[b] = max(count, 1) if int(valid[b].sum()) else 0
        counts = torch.minimum(counts, totals)  # (B,)
        return Allocation(total=counts, critical=counts)


def _per_row(budget: Any, rows: int) -> list:
    """One budget per row: a sequence as given, a single budget repeated."""
    return list(budget) if isinstance(budget, Sequence) else [budget] * rows


#: Registration order.
GPRUNE_STAGES = (GPruneRelevance, GPruneBudget)
