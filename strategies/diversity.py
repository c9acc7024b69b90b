"""Diversity supplementers: fill the rest of the budget with tokens the critical set misses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from torch import Tensor

from vtprune.framework.signals import Signals
from vtprune.framework.stages import DiversitySupplementer, Supplement

from .functional.farthest_point import farthest_point_select
from .functional.kmeans_select import kmeans_select
from .functional.ranking import top_k_mask
from .functional.seeded import row_uniform
from .functional.spatial import grid_uniform_select

__all__ = ["FarthestPoint", "KMeansDiversity", "RandomDiversity", "GridDiversity", "NoDiversity"]


@dataclass(frozen=True, eq=False)
class FarthestPoint(DiversitySupplementer):
    """Greedy farthest point in cosine space, seeded with the critical set (ZSPAPrune)."""

    name: ClassVar[str] = "fps"
    description: ClassVar[str] = "greedy farthest point: add the token least similar to everything selected so far"

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        return Supplement(farthest_point_select(signals.visual, selected, counts, valid, scores))


@dataclass(frozen=True, eq=False)
class KMeansDiversity(DiversitySupplementer):
    """One token per k-means cluster of the remaining candidates."""

    name: ClassVar[str] = "kmeans"
    description: ClassVar[str] = "k-means (scikit-learn, seeded) on the remaining tokens; keep the one nearest each centroid"
    stochastic: ClassVar[Optional[bool]] = True
    seed: int = 0
    n_init: int = 1
    max_iter: int = 100

    def __post_init__(self) -> None:
        if self.n_init < 1 or self.max_iter < 1:
            raise ValueError("n_init and max_iter must be >= 1")

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        return Supplement(kmeans_select(signals.visual, selected, counts, valid, self.seed, self.n_init, self.max_iter))


@dataclass(frozen=True, eq=False)
class RandomDiversity(DiversitySupplementer):
    """Seeded uniformly random tokens among the remaining ones."""

    name: ClassVar[str] = "random"
    description: ClassVar[str] = "seeded random tokens among the remaining ones (per-row generator)"
    stochastic: ClassVar[Optional[bool]] = True
    seed: int = 0

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        draws = row_uniform(signals.batch_size, signals.num_tokens, self.seed, signals.visual.device)  # (B, N)
        return Supplement(top_k_mask(draws, counts, valid & ~selected))


@dataclass(frozen=True, eq=False)
class GridDiversity(DiversitySupplementer):
    """Tokens spread uniformly over each row's patch grid (`Signals.row_grids()`; a row without one: 1-D order)."""

    name: ClassVar[str] = "grid"
    description: ClassVar[str] = "spatially uniform tokens over the patch grid (nearest free token to each lattice point)"

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        return Supplement(grid_uniform_select(selected, counts, valid, signals.row_grids()))


@dataclass(frozen=True, eq=False)
class NoDiversity(DiversitySupplementer):
    """Adds nothing: the critical selector fills the whole budget."""

    name: ClassVar[str] = "none"
    description: ClassVar[str] = "no diversity tokens: the critical selector fills the whole budget"
    adds_tokens: ClassVar[bool] = False

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        raise AssertionError("the pipeline never asks 'none' for tokens")
