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

from vtprune.framework.signals import Signals
from vtprune.framework.stages import DiversitySupplementer, Supplement

from .functional.tome import tome_reduce

__all__ = ["ToMeMerge", "MERGE_STAGES"]


@dataclass(frozen=True, eq=False)
class ToMeMerge(DiversitySupplementer):
    """ToMe's bipartite soft matching at one point: the unselected real tokens of each row are merged among
    themselves (size-weighted averages, cosine of the tokens as the metric) until the asked count remains; each
    merged token sits at its B-set destination's position. The in-tower ToMe is ``placement.vision_layers``."""

    name: ClassVar[str] = "tome"
    description: ClassVar[str] = "ToMe bipartite soft matching on the remaining tokens down to the budget (size-weighted merge)"

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        keep, values, assignment = tome_reduce(signals.visual, counts, valid=valid & ~selected)
        return Supplement(keep, values, assignment)


MERGE_STAGES = (ToMeMerge,)
