"""MustDrop's stages (docs/methods.md, "MustDrop"): the vision-stage local merge, the prefill dual-attention
filter with the CLS key set, and the split that reports the official (adaptive) kept set as the critical one.

The kept count is adaptive (``budget.mustdrop_split`` has ``adaptive_counts``): each image keeps the tokens the
official threshold rules keep, at most the budget (the budget is a **cap**; a budget at or above the image's tokens,
e.g. 1.0, keeps the image whole: `Pipeline.select`'s keep-all rule). Above the cap the highest-scoring passed tokens
are kept.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from vtprune.framework.signals import Signals
from vtprune.framework.stages import Allocation, BudgetAllocator, DiversitySupplementer, RelevanceScorer, Supplement

from .functional.mustdrop import PASS_TIER, dual_scores, local_merge_to_count
from .functional.ranking import top_k_mask

__all__ = ["MustDropDual", "MustDropMerge", "MustDropFill", "MustDropBudget", "MUSTDROP_STAGES", "merge_supplement"]

#: Whether `Supplement` carries the merge assignment (framework/stages.py on the ``merge`` branch).
_SUPPLEMENT_HAS_ASSIGNMENT = "assignment" in {f.name for f in dataclasses.fields(Supplement)}


def merge_supplement(mask: Tensor, values: Tensor, assignment: Tensor) -> Supplement:
    """A merge-style `Supplement`: ``values`` and, where `Supplement` has the field, ``assignment`` (positions)."""
    if _SUPPLEMENT_HAS_ASSIGNMENT:
        return Supplement(mask, values, assignment=assignment)  # type: ignore[call-arg]
    return Supplement(mask, values)


@dataclass(frozen=True, eq=False)
class MustDropDual(RelevanceScorer):
    """MustDrop's prefill dual-attention filter plus the CLS key set, as tiered scores.

    A token the official rules keep (``attn_sum >= attn_sum.sum() * global_thr`` or ``max >= individual_thr``,
    or one of the ``ceil(keep_rate * N)`` tokens with the largest CLS attention) scores ``PASS_TIER`` plus its
    share of the global text attention; the others score the share alone. The text rows are the last prompt
    token (``Signals.attention``); the official filter sums every text token after the image.
    """

    name: ClassVar[str] = "mustdrop_dual"
    description: ClassVar[str] = "MustDrop dual-attention filter (global_thr / individual_thr) + CLS key set, as tiered scores"
    #: The class needs ``attention``; an instance with ``keep_rate > 0`` also ``cls_attention`` (the key set).
    requires: ClassVar[frozenset[str]] = frozenset({"attention"})
    global_thr: float = 0.011
    individual_thr: float = 0.01
    keep_rate: float = 0.08

    def __post_init__(self) -> None:
        if self.global_thr < 0 or self.individual_thr < 0:
            raise ValueError(f"global_thr and individual_thr must be >= 0, got {self.global_thr}, {self.individual_thr}")
        if not 0.0 <= self.keep_rate <= 1.0:
            raise ValueError(f"keep_rate must be in [0, 1], got {self.keep_rate}")
        if self.keep_rate > 0:
            object.__setattr__(self, "requires", frozenset({"attention", "cls_attention"}))

    def score(self, signals: Signals) -> Tensor:
        attention = signals.attention.unsqueeze(2)  # (B, H, 1, N): the last prompt token is the text row
        return dual_scores(attention, signals.cls_attention if self.keep_rate > 0 else None, signals.valid(), self.global_thr, self.individual_thr, self.keep_rate)


@dataclass(frozen=True, eq=False)
class MustDropBudget(BudgetAllocator):
    """MustDrop's adaptive count: each row keeps the tokens scoring at least ``PASS_TIER`` (what the official
    dual-attention filter and key set keep), at most the resolved budget (the budget is a cap), all of them critical.
    A budget resolving to every real token of a row keeps the row whole (`Pipeline.select`'s keep-all rule,
    `BudgetAllocator.covers`), so keep-all reproduces the unpruned model.

    Without scores (no relevance stage) nothing passes a threshold: the row keeps the whole budget, none of it
    critical (a diversity stage fills it).
    """

    name: ClassVar[str] = "mustdrop_split"
    description: ClassVar[str] = "MustDrop adaptive count: the tokens the official thresholds keep (score >= PASS_TIER), the budget as a cap"
    adaptive_counts: ClassVar[bool] = True

    def adapt(self, signals: Signals, budget: Any, totals: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Allocation:
        if scores is None:
            return Allocation(total=totals, critical=torch.zeros_like(totals))
        passed = torch.minimum(((scores >= PASS_TIER) & valid).sum(dim=1), totals)  # (B,): capped at the budget
        return Allocation(total=passed, critical=passed)

    def allocate(self, totals: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Allocation:
        """The split of a given total (for callers that fix the count): critical = the passed tokens, capped."""
        if scores is None:
            return Allocation(total=totals, critical=torch.zeros_like(totals))
        passed = ((scores >= PASS_TIER) & valid).sum(dim=1)  # (B,)
        return Allocation(total=totals, critical=torch.minimum(passed, totals))


@dataclass(frozen=True, eq=False)
class MustDropFill(DiversitySupplementer):
    """The rest of the budget by descending score (ties to the lower index; by position without scores)."""

    name: ClassVar[str] = "mustdrop_fill"
    description: ClassVar[str] = "fill the rest of the budget with the highest-scoring remaining tokens (MustDrop beyond its thresholds)"

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        ranked = scores if scores is not None else torch.zeros(valid.shape, device=valid.device)  # (B, N)
        return Supplement(top_k_mask(ranked, counts, valid & ~selected))


@dataclass(frozen=True, eq=False)
class MustDropMerge(DiversitySupplementer):
    """MustDrop's vision-stage local merge (3x3 windows of similar neighbours) continued to the budget.

    Windows rank by the official mean pairwise cosine similarity; each merged window's tokens are averaged
    into its bottom-right token (`functional.mustdrop.local_merge_to_count`). The official rule merges every
    window at or above a threshold (0.8; `functional.mustdrop.local_merge`): the budget that reproduces it
    is ``N - (window**2 - 1) * r``, r = those windows. Already selected tokens are never merged away; with a
    critical set the grid is broken and the rest is cut as an ungridded sequence.
    """

    name: ClassVar[str] = "local_merge"
    description: ClassVar[str] = "MustDrop local merge: similar window x window neighbourhoods averaged into their last token, to the budget"
    window: int = 3

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError(f"window must be >= 2, got {self.window}")

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        if bool(selected.any()):
            # a critical set splits the grid: merge on the remaining tokens as an ungridded sequence
            grids = [None] * selected.shape[0]
        else:
            grids = signals.row_grids()
        merged = local_merge_to_count(signals.visual, grids, counts, valid & ~selected, self.window)
        return merge_supplement(merged.keep, merged.values, merged.assignment)


#: Registration order.
MUSTDROP_STAGES = (MustDropDual, MustDropBudget, MustDropFill, MustDropMerge)
