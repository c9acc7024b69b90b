"""FlowCut as a stage: ``relevance.flowcut`` marks the information-flow rule that placement ``vision_layers`` runs
inside the CLIP tower (`adapters.tower_flowcut`, maths in `functional.flowcut`). docs/methods.md ("FlowCut") states
the schedule, the budget mapping and the deviations from the official code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor

from vtprune.framework.signals import Signals
from vtprune.framework.stages import RelevanceScorer

__all__ = ["FlowCutRelevance", "FLOWCUT_STAGES"]


@dataclass(frozen=True, eq=False)
class FlowCutRelevance(RelevanceScorer):
    """FlowCut's information-flow score. With placement ``vision_layers`` the tower hooks score every layer before
    the feature layer from the layer's own q / k / v (``(CLS-attention share + CLS-value-similarity share) *
    ||head-mean value||_1``, blended 0.5 / 0.5 across layers) and prune every second layer, entropy-adaptively, down
    to the budget; this method then never runs. At a single point (any other placement, or ``Pipeline.select`` on
    given signals) no projection is known: the score is then only FlowCut's magnitude factor, the L1 norm of each
    token.

    Args:
        count: how many patches a pruning layer in the tower asks each image to prune. ``'image'`` (default): each
            image's own entropy-adaptive count, so a batch gives every image exactly what it gets alone (rows may be
            ragged between pruning layers; padding is masked). ``'batch'``: the official shared count
            (``adaptive_prune_ratio``'s ``r.max(0)``): every image prunes the largest count of the batch, so rows
            stay equal-length, and an image's result depends on its batch-mates: batch != alone by design, as in
            the official code (one image per forward: both agree). It acts in the tower only, not on the one-point
            score.
    """

    name: ClassVar[str] = "flowcut"
    description: ClassVar[str] = (
        "FlowCut: CLS information flow scored and pruned layer by layer inside the tower (placement vision_layers); "
        "elsewhere the token L1 norm"
    )
    count: Literal["image", "batch"] = "image"

    def score(self, signals: Signals) -> Tensor:
        return signals.visual.float().abs().sum(dim=-1)  # (B, N)


FLOWCUT_STAGES = (FlowCutRelevance,)
