"""Temporal (video) stages: thin wrappers over `vtprune.strategies.functional.temporal` and
`vtprune.strategies.functional.prunevid` (docs/methods.md, "DyCoke", "PruneVid").

Video rows carry ``Signals.frames`` (T, H, W) and ``Signals.frame_index`` (frame of each token, -1 outside the
frame grids); each stage says how it treats rows without frames and the tokens outside the frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from vtprune.framework.signals import Signals
from vtprune.framework.stages import RelevanceScorer

from .functional.temporal import dycoke_ttm
from .prunevid import PRUNEVID_STAGES

__all__ = ["DyCokeRelevance", "VIDEO_STAGES"]


@dataclass(frozen=True, eq=False)
class DyCokeRelevance(RelevanceScorer):
    """DyCoke's temporal token merging (TTM) as tiered scores: the tokens the official rules keep (whole frames,
    the ``int((1 - k) P)`` least similar tokens of each pruned frame, tokens outside the frames) score
    ``DYCOKE_KEEP_TIER`` and more, the dropped ones their dissimilarity to the reference frame (``(1 - cos) / 2``),
    so ``budget.mustdrop_split`` marks the official set critical and ``diversity.mustdrop_fill`` continues by
    dissimilarity. A row without frames is one frame (everything kept)."""

    name: ClassVar[str] = "dycoke_ttm"
    description: ClassVar[str] = "DyCoke temporal token merging: pruned frames keep their tokens least similar to the reference frame (k = fraction dropped)"
    optional: ClassVar[frozenset[str]] = frozenset({"frames", "frame_index"})
    #: Reads ``frames`` / ``frame_index`` when present; without them every row is one frame (nothing pruned by TTM),
    #: so the stage runs at any pruning point (contract tests, image inputs).
    requires: ClassVar[frozenset[str]] = frozenset()
    k: float = 0.3

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not 0.0 <= float(self.k) < 1.0:
            raise ValueError(f"k (fraction of a pruned frame's tokens dropped) must be in [0, 1), got {self.k!r}")

    def score(self, signals: Signals) -> Tensor:
        return dycoke_ttm(signals.visual, signals.frame_index, signals.row_frames(), signals.valid(), self.k).scores


#: Registration order.
VIDEO_STAGES = (DyCokeRelevance, *PRUNEVID_STAGES)
