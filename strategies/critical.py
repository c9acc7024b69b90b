"""Critical selectors: pick the task-critical tokens from the relevance scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from vtprune.framework.stages import CriticalSelector

from .functional.ranking import top_k_mask

__all__ = ["TopKCritical"]


@dataclass(frozen=True, eq=False)
class TopKCritical(CriticalSelector):
    """The highest-scoring tokens; ties go to the lower index."""

    name: ClassVar[str] = "critical"
    description: ClassVar[str] = "top-k tokens by relevance score (ties to the lower index)"

    def select(self, scores: Tensor, counts: Tensor, valid: Tensor) -> Tensor:
        return top_k_mask(scores, counts, valid)
