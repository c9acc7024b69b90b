"""Merging stages (issue 14): stages whose kept tokens stand for several original tokens.

A merging diversity stage returns `Supplement.values` (the merged values) and `Supplement.assignment` (the
position each token was merged into); ``Pipeline.select`` turns them into `Selection.values`, ``sizes`` and
``assignment`` (framework/selection.py). Each stage is a thin wrapper over a pure function of
`vtprune.strategies.functional`; docs/methods.md says which official code it reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from torch import Tensor

from vtprune.framework.signals import PLACEMENT_SIGNALS, Signals
from vtprune.framework.stages import DiversitySupplementer, Drop, LayerPlacement, Supplement

from .functional.tome import tome_reduce

__all__ = ["ToMeMerge", "VisionLayers", "MERGE_STAGES"]


@dataclass(frozen=True, eq=False)
class ToMeMerge(DiversitySupplementer):
    """ToMe's bipartite soft matching at one point: the unselected real tokens of each row are merged among
    themselves (size-weighted averages, cosine of the tokens as the metric) until the asked count remains; each
    merged token sits at its B-set destination's position. The in-tower ToMe is ``placement.vision_layers``."""

    name: ClassVar[str] = "tome_merge"
    description: ClassVar[str] = "ToMe bipartite soft matching on the remaining tokens down to the budget (size-weighted merge)"

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        keep, values, assignment = tome_reduce(signals.visual, counts, valid=valid & ~selected)
        return Supplement(keep, values, assignment)


@dataclass(frozen=True, eq=False)
class VisionLayers(LayerPlacement):
    """Inside the vision tower, progressively across its layers (ToMe): every encoder layer up to the feature
    layer merges tokens between its attention and its MLP, later layers add ``log(size)`` to their attention
    logits; the LLM receives the reduced sequence (the image's placeholders beyond the reduced count are dropped
    at the decoder input). ``r = 0``: tokens per layer derived from the budget (exactly the budget remains);
    ``r > 0``: the official constant r per layer, never below the budget. Adapters: CLIP towers (LLaVA-1.5);
    see ``adapters/tower_merge.py``."""

    name: ClassVar[str] = "vision_layers"
    description: ClassVar[str] = "merge inside the vision tower layer by layer (ToMe); the LLM gets the reduced sequence"
    provides: ClassVar[frozenset[str]] = PLACEMENT_SIGNALS["vision_layers"]
    r: int = 0

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ValueError(f"r must be >= 0 (0 = derived from the budget), got {self.r}")

    def drops(self, budget: int | float) -> tuple[Drop, ...]:
        return (Drop("vision_layers", None, budget),)


MERGE_STAGES = (ToMeMerge, VisionLayers)
