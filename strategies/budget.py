"""Budget allocators: per-row totals and the critical/diversity split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from vtprune.framework.budget import scaled_counts
from vtprune.framework.signals import Signals
from vtprune.framework.stages import Allocation, BudgetAllocator

from .functional.auto_split import check_gap_parameters, relevance_coverage_counts, relevance_gap_counts

__all__ = [
    "AllCriticalBudget", "AutoSplit", "FixedSplit", "DynamicSplit", "GapSplit", "OwnCountAllocator", "critical_mass_counts",
]


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


@dataclass(frozen=True, eq=False)
class FixedSplit(BudgetAllocator):
    """A fixed share of each row's total goes to the critical selector."""

    name: ClassVar[str] = "split"
    description: ClassVar[str] = "fixed split: critical = round(critical * total), the rest to diversity"
    plans_from_totals: ClassVar[bool] = True
    critical: float = 0.6

    def __post_init__(self) -> None:
        _check_fraction("critical", self.critical)

    def allocate(self, totals: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Allocation:
        critical = scaled_counts(totals, self.critical, rounding="half_up")  # (B,)
        return Allocation(total=totals, critical=critical)


def critical_mass_counts(scores: Tensor, valid: Tensor, mass: float, temperature: float) -> Tensor:
    """(B,) long: the smallest number of top-scoring tokens whose softmax mass reaches ``mass``.

    The distribution is ``softmax(scores / temperature)`` over the row's real tokens.
    """
    logits = (scores.float() / temperature).masked_fill(~valid, float("-inf"))  # (B, N)
    probabilities = torch.softmax(logits, dim=1).nan_to_num(0.0)  # (B, N)
    ordered = torch.sort(probabilities, dim=1, descending=True).values  # (B, N)
    below = torch.cumsum(ordered, dim=1) < mass - 1e-12  # (B, N) still short of the mass
    return below.sum(dim=1) + 1  # (B,)


@dataclass(frozen=True, eq=False)
class DynamicSplit(BudgetAllocator):
    """Per-row split from the score distribution.

    Rule: critical = the smallest k whose top-k tokens hold ``mass`` of softmax(scores /
    temperature); then clamped to [round(min_critical * total), round(max_critical * total)].
    A peaked score distribution (a few clearly relevant tokens) gives a small critical set and
    more diversity; a flat one gives more critical tokens. Without scores everything goes to
    diversity.
    """

    name: ClassVar[str] = "dynamic"
    description: ClassVar[str] = "per-row split: the smallest critical set holding `mass` of softmax(scores/temperature)"
    mass: float = 0.5
    temperature: float = 0.05
    min_critical: float = 0.1
    max_critical: float = 0.9

    def __post_init__(self) -> None:
        _check_fraction("mass", self.mass)
        _check_fraction("min_critical", self.min_critical)
        _check_fraction("max_critical", self.max_critical)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.min_critical > self.max_critical:
            raise ValueError("min_critical must not exceed max_critical")

    def allocate(self, totals: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Allocation:
        if scores is None:
            return Allocation(total=totals, critical=torch.zeros_like(totals))
        wanted = critical_mass_counts(scores, valid, self.mass, self.temperature)  # (B,)
        low = scaled_counts(totals, self.min_critical, rounding="half_up")  # (B,)
        high = scaled_counts(totals, self.max_critical, rounding="half_up")  # (B,)
        critical = torch.minimum(torch.maximum(wanted, low), high)
        return Allocation(total=totals, critical=torch.minimum(critical, totals))


@dataclass(frozen=True, eq=False)
class AllCriticalBudget(BudgetAllocator):
    """Base of the peers' count rules that keep their whole count by score (no diversity share): a subclass
    names the method and the fraction ``rounding`` of its official count (FastV, PyramidDrop, PruneVid's
    in-LLM step, G-Prune); every kept token is critical."""

    def allocate(self, totals: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Allocation:
        return Allocation(total=totals, critical=totals)


@dataclass(frozen=True, eq=False)
class _ScoreRuleSplit(BudgetAllocator):
    """A per-row split computed from the relevance scores by ``critical_counts``; without scores everything goes to
    diversity."""

    def critical_counts(self, scores: Tensor, valid: Tensor, totals: Tensor) -> Tensor:  # (B,) long
        raise NotImplementedError

    def allocate(self, totals: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Allocation:
        if scores is None:
            return Allocation(total=totals, critical=torch.zeros_like(totals))
        return Allocation(total=totals, critical=self.critical_counts(scores, valid, totals))


@dataclass(frozen=True, eq=False)
class AutoSplit(_ScoreRuleSplit):
    """Per-row split trading relevance mass against coverage (``functional.auto_split``).

    critical = #{top tokens whose mass in softmax(scores / temperature) exceeds trade / total}:
    a peaked relevance keeps its few standout tokens for sure, a flat one (a question about the
    whole scene) spends the budget on diversity. Training-free: the two constants were tuned on
    the organism's validation splits of both tasks (docs/demo.md). Without scores everything goes
    to diversity.
    """

    name: ClassVar[str] = "auto"
    description: ClassVar[str] = (
        "per-row split: critical = top tokens whose softmax(scores/temperature) mass exceeds trade/total"
    )
    temperature: float = 0.2  # tuned on the validation splits (docs/demo.md, "Automatic split")
    trade: float = 3.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.trade < 0:
            raise ValueError(f"trade must be >= 0, got {self.trade}")

    def critical_counts(self, scores: Tensor, valid: Tensor, totals: Tensor) -> Tensor:
        return relevance_coverage_counts(scores, valid, totals, self.temperature, self.trade)  # (B,)


@dataclass(frozen=True, eq=False)
class GapSplit(_ScoreRuleSplit):
    """Per-row split keeping the prompt's relevant set (``functional.relevance_gap_counts``; ``zspaprune_auto``).

    k = the number of top tokens before the first fall of at least ``drop`` in the sorted relevance (looked for
    within the top ``window + 1``; none: k = 0); critical = min(k, total - reserve), or min(ceil(extend k),
    total - reserve) when k >= 2. One named object keeps its token, several near-identical named objects keep
    them all and the next tokens by relevance, spread relevance buys coverage. Training-free: the four
    constants were chosen on the organism's validation splits of its three tasks (docs/demo.md, "Automatic
    split"). Without scores everything goes to diversity.
    """

    name: ClassVar[str] = "gap"
    description: ClassVar[str] = (
        "per-row split: critical = the top tokens before the first relevance drop >= drop (within window), "
        "a set of k >= 2 extended to ceil(extend k), at most total - reserve"
    )
    drop: float = 0.35  # cosine units; all four chosen on the validation splits (docs/demo.md, "Automatic split")
    reserve: int = 2
    window: int = 8
    extend: float = 1.5

    def __post_init__(self) -> None:
        check_gap_parameters(self.drop, self.reserve, self.window, self.extend)

    def critical_counts(self, scores: Tensor, valid: Tensor, totals: Tensor) -> Tensor:
        return relevance_gap_counts(scores, valid, totals, self.drop, self.reserve, self.window, self.extend)  # (B,)


class OwnCountAllocator(BudgetAllocator):
    """An adaptive allocator for a method that keeps its own count: the resolved total is the method's target (its
    ratio ``total / valid``), handed whole to the diversity stage (no critical share), which keeps the method's
    data-dependent count (docs/architecture.md, "Adaptive counts")."""

    adaptive_counts: ClassVar[bool] = True

    def adapt(self, signals: Signals, budget: Any, totals: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Allocation:
        return Allocation(total=totals, critical=torch.zeros_like(totals))

    def allocate(self, totals: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Allocation:
        return Allocation(total=totals, critical=torch.zeros_like(totals))
