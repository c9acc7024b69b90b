"""LLaVA-PruMerge / PruMerge+ as stages: ``diversity.prumerge`` (the whole method: adaptive IQR count, key-neighbour
merge, extra token; `functional.prumerge`) and ``budget.prumerge`` (the budget is a cap on the adaptive count).
docs/methods.md ("PruMerge") states the official code read and every deviation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import torch
from torch import Tensor

from vtprune.framework.hints import HINT_FULL_WIDTH_CLS
from vtprune.framework.signals import Signals
from vtprune.framework.stages import DiversitySupplementer, Supplement

from .budget import OwnCountAllocator
from .functional.prumerge import PRUMERGE_NEIGHBOURS, prumerge_select

__all__ = ["PruMergeMerge", "PruMergeBudget", "PRUMERGE_STAGES"]


@dataclass(frozen=True, eq=False)
class PruMergeMerge(DiversitySupplementer):
    """PruMerge on each row's remaining tokens: the CLS-attention IQR outliers (PruMerge+: and spatially uniform
    samples) stay, each plus the attention-weighted sum of its ``neighbours`` key-nearest tokens; the other tokens
    are summed (attention-weighted) into one extra token at the row's last pruned position. Keeps the official count,
    at most ``counts`` (then the head of the official list and the extra token): ``exact_counts`` is False.

    ``order``: ``position`` (default) hands the LLM the kept tokens in ascending position, the extra token at the last
    pruned position; ``official`` in the official output order (top-k by descending attention, then PruMerge+'s
    samples, the extra token last; `Supplement.order`), written into the image's first placeholder slots.

    Declares the ``full_width_cls_attention`` hint: the adapter gives the CLS attention and keys of the tower layer
    after the feature layer as one full-width head (the official ``layers[23]`` q/k hooks)."""

    name: ClassVar[str] = "prumerge"
    description: ClassVar[str] = (
        "PruMerge: CLS-attention IQR outliers (+ spatial samples with plus) keep, each adds its key-nearest tokens "
        "weighted by attention; the rest summed into one extra token; adaptive count (at most the budget)"
    )
    requires: ClassVar[frozenset[str]] = frozenset({"cls_attention", "visual_keys"})
    adapter_hints: ClassVar[frozenset[str]] = frozenset({HINT_FULL_WIDTH_CLS})
    exact_counts: ClassVar[bool] = False
    plus: bool = False
    neighbours: int = PRUMERGE_NEIGHBOURS
    order: Literal["position", "official"] = "position"

    def __post_init__(self) -> None:
        if self.neighbours < 1:
            raise ValueError(f"neighbours must be >= 1, got {self.neighbours}")
        if self.order not in ("position", "official"):
            raise ValueError(f"order must be 'position' or 'official', got {self.order!r}")

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        args = (signals.visual, signals.cls_attention, signals.visual_keys, counts, valid & ~selected, self.plus, self.neighbours)
        keep, values, ranks = prumerge_select(*args, ranked=self.order == "official")  # (B, N), (B, N, D), (B, N)
        if ranks is None:
            return Supplement(keep, values)
        selected_first = selected.long().cumsum(1) - 1  # (B, N): already selected tokens first, ascending (none here)
        return Supplement(keep, values, order=torch.where(selected, selected_first, ranks + selected.sum(1, keepdim=True)))


@dataclass(frozen=True, eq=False)
class PruMergeBudget(OwnCountAllocator):
    """PruMerge's count is its own (IQR outliers per image): the resolved budget is a cap handed whole to
    ``diversity.prumerge``; a budget covering every token keeps the image whole (keep-all rule). The official
    method has no budget: any budget at or above its count (e.g. ``N - 1``) reproduces it."""

    name: ClassVar[str] = "prumerge"
    description: ClassVar[str] = "adaptive: PruMerge keeps its own IQR count; the budget is a cap (all tokens covered: keep all)"


#: Registration order.
PRUMERGE_STAGES = (PruMergeMerge, PruMergeBudget)
