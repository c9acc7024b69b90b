"""G-Prune's stages (docs/methods.md, "G-Prune"): thin wrappers over `functional.gprune`.

``relevance.gprune`` scores every visual token by information propagation on its image's similarity graph;
``budget.gprune`` counts ``int(keep_ratio * n)`` (truncation) as the official ``topk`` does, all critical; the
`gprune` preset keeps the top tokens with ``critical.topk_official`` at ``pre_llm`` (the projector output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from vtprune.framework.signals import Signals
from vtprune.framework.stages import RelevanceScorer

from .budget import AllCriticalBudget
from .functional.gprune import gprune_scores

__all__ = ["GPruneRelevance", "GPruneBudget", "GPRUNE_STAGES"]


@dataclass(frozen=True, eq=False)
class GPruneRelevance(RelevanceScorer):
    """G-Prune's importance: token norms propagated ``iterations`` steps over the row's cosine graph (edges below
    ``similarity`` cut, softmax(sim / ``temperature``) transitions), divided by each token's degree. The defaults
    are the official ones (``llava_arch.py``: ``similarity = 0.5``, ``temperature = 0.03``, ``iterate_num = 5``)."""

    name: ClassVar[str] = "gprune"
    description: ClassVar[str] = "G-Prune: norms propagated over the cosine graph (softmax(sim/t), cut below `similarity`) / degree"
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
            signals.visual, signals.visual_mask, self.similarity, self.temperature, self.iterations
        )  # (B, N)


@dataclass(frozen=True, eq=False)
class GPruneBudget(AllCriticalBudget):
    """G-Prune's count: ``int(keep_ratio * n)`` (truncation) for a fraction; every token critical (top-k)."""

    name: ClassVar[str] = "gprune"
    description: ClassVar[str] = "G-Prune count int(n*ratio) (truncation) for a fraction; every token critical"
    plans_from_totals: ClassVar[bool] = True
    rounding: ClassVar[str] = "floor"


#: Registration order.
GPRUNE_STAGES = (GPruneRelevance, GPruneBudget)
