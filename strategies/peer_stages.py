"""Stages that turn the peer methods (FastV, PyramidDrop, VisionZip, DivPrune, CDPruner, DART,
VisPruner, random, pooling) into compositions. Each is a thin wrapper over a tested pure function of
`vtprune.strategies.functional`; docs/methods.md says which official code each one reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import torch
from torch import Tensor

from vtprune.framework.budget import scaled_counts
from vtprune.framework.hints import HINT_FINAL_NORM, HINT_OWN_LAYER
from vtprune.framework.signals import PLACEMENT_SIGNALS, Signals
from vtprune.framework.stages import (
    Allocation,
    BudgetAllocator,
    CriticalSelector,
    DiversitySupplementer,
    Drop,
    LayerPlacement,
    RelevanceScorer,
    Supplement,
)

from .budget import AllCriticalBudget
from .functional.cdpruner import cdpruner_relevance, cdpruner_supplement
from .functional.common import argsort_indices, argsort_keep, topk_indices, topk_keep
from .functional.dart import dart_supplement
from .functional.divprune import divprune_supplement
from .functional.fitprune import fitprune_sort_drop, fitprune_sort_drop_indices
from .functional.pooling import pooling_exact_select
from .functional.random_prune import random_select
from .functional.vispruner import vispruner_supplement
from .functional.visionzip import visionzip_contextual

__all__ = [
    "ClsAttentionRelevance",
    "ClipTextRelevance",
    "KeyNormRelevance",
    "OfficialTopK",
    "VisionZipMerge",
    "DivPruneDiversity",
    "DPPDiversity",
    "DartDiversity",
    "VisPrunerDiversity",
    "RandPermDiversity",
    "PoolingDiversity",
    "FastVBudget",
    "PDropBudget",
    "VisionZipBudget",
    "DivPruneRatio",
    "DartBudget",
    "VisPrunerBudget",
    "PreLLMClip",
    "PEER_STAGES",
]

def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


# -- relevance ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ClsAttentionRelevance(RelevanceScorer):
    """The vision encoder's CLS-to-patch attention, reduced over heads (VisionZip sums, VisPruner means)."""

    name: ClassVar[str] = "cls_attention"
    description: ClassVar[str] = "CLS-to-patch attention of the vision encoder, summed (VisionZip) or averaged (VisPruner) over heads"
    requires: ClassVar[frozenset[str]] = frozenset({"cls_attention"})
    reduce: Literal["sum", "mean"] = "sum"

    def score(self, signals: Signals) -> Tensor:
        attention = signals.cls_attention.float()  # (B, H, N)
        return attention.sum(dim=1) if self.reduce == "sum" else attention.mean(dim=1)  # (B, N)


@dataclass(frozen=True, eq=False)
class ClipTextRelevance(RelevanceScorer):
    """CDPruner's relevance: negated mean CLIP image-text cosine, min-max normalised per row."""

    name: ClassVar[str] = "clip_text"
    description: ClassVar[str] = "CDPruner relevance: -mean cos(CLIP patch, CLIP text), min-max normalised per row"
    requires: ClassVar[frozenset[str]] = frozenset({"clip_visual", "clip_text"})

    def score(self, signals: Signals) -> Tensor:
        return cdpruner_relevance(
            signals.clip_visual, signals.clip_text, signals.valid(), signals.clip_text_mask
        ).float()  # (B, N)


@dataclass(frozen=True, eq=False)
class KeyNormRelevance(RelevanceScorer):
    """DART's pivot score: L1 norm of each visual token's key states (heads flattened)."""

    name: ClassVar[str] = "key_norm"
    description: ClassVar[str] = "L1 norm of the visual tokens' key states at the scoring layer (DART pivots)"
    requires: ClassVar[frozenset[str]] = frozenset({"visual_keys"})

    def score(self, signals: Signals) -> Tensor:
        keys = signals.visual_keys
        flat = keys.reshape(keys.shape[0], keys.shape[1], -1)  # (B, N, Hk*dk)
        return torch.norm(flat, p=1, dim=-1).float()  # (B, N)


# -- critical ----------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class OfficialTopK(CriticalSelector):
    """Top-k with the official codes' tie behaviour: ``torch.topk`` (FastV, PyramidDrop, VisionZip,
    DART), ``argsort(descending=True)[:k]`` (VisPruner) or deleting the first ``n - k`` of ``torch.sort`` ascending
    (FitPrune, ``sort_drop``) on each row's valid slice.

    `critical` breaks ties to the lower index; these ops order ties in an implementation-defined
    way that only the same call on a same-length slice reproduces.
    """

    name: ClassVar[str] = "topk_official"
    description: ClassVar[str] = (
        "top-k with the official tie order: torch.topk / argsort / ascending-sort deletion on the row's valid slice"
    )
    op: Literal["topk", "argsort", "sort_drop"] = "topk"

    def select(self, scores: Tensor, counts: Tensor, valid: Tensor) -> Tensor:
        if self.op == "argsort":
            return argsort_keep(scores, counts, valid)
        if self.op == "sort_drop":
            return fitprune_sort_drop(scores, counts, valid)
        return topk_keep(scores, counts, valid)

    def select_indices(self, scores: Tensor, count: int) -> Optional[Tensor]:
        if self.op == "sort_drop":
            return fitprune_sort_drop_indices(scores, count)  # (B, k)
        if self.op == "argsort":
            return argsort_indices(scores, count)  # (B, k)
        return topk_indices(scores, count)  # (B, k)


# -- diversity ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class VisionZipMerge(DiversitySupplementer):
    """VisionZip's contextual tokens: uniform-stride centres over the remaining tokens, each absorbing
    the tokens most cosine-similar in head-averaged key space (value = centre + mean of merged)."""

    name: ClassVar[str] = "visionzip"
    description: ClassVar[str] = "VisionZip contextual tokens: strided centres, key-cosine assignment, value = centre + mean(merged)"
    requires: ClassVar[frozenset[str]] = frozenset({"visual_keys"})

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        keep, values = visionzip_contextual(signals.visual, signals.visual_keys, selected, counts, valid)
        return Supplement(keep, values)


@dataclass(frozen=True, eq=False)
class DivPruneDiversity(DiversitySupplementer):
    """DivPrune's max-min (farthest point) greedy in cosine distance with its first-token rule."""

    name: ClassVar[str] = "divprune"
    description: ClassVar[str] = "DivPrune max-min greedy on 1 - cos; first pick = token whose nearest other token is farthest"

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        return Supplement(divprune_supplement(signals.visual, selected, counts, valid))


@dataclass(frozen=True, eq=False)
class DPPDiversity(DiversitySupplementer):
    """CDPruner's conditional DPP: kernel ``r_i cos(v_i, v_j) r_j`` with r = the relevance scores,
    greedy fast MAP (conditioned on the already selected tokens)."""

    name: ClassVar[str] = "dpp"
    description: ClassVar[str] = "conditional DPP (CDPruner): kernel r_i*cos(v_i,v_j)*r_j, greedy fast MAP"
    theta: Optional[float] = None

    def __post_init__(self) -> None:
        if self.theta is not None and not 0.0 <= self.theta < 1.0:
            raise ValueError(f"theta must be None or in [0, 1), got {self.theta}")

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        return Supplement(cdpruner_supplement(signals.visual, scores, selected, counts, valid, self.theta))


@dataclass(frozen=True, eq=False)
class DartDiversity(DiversitySupplementer):
    """DART: around each pivot (the selected image tokens + top-L1-key prompt tokens) keep the least
    cosine-similar image tokens.

    ``faithful=True`` reproduces the official count (``max_num_trunction`` = the budget: image
    pivots + P * (budget // P) tokens, i.e. budget + 4 with the defaults) and the official pivot /
    candidate order. It then breaks the Selection invariant ``count == budget`` on purpose:
    :attr:`exact_counts` is False and contract tests must skip it.
    """

    name: ClassVar[str] = "dart"
    description: ClassVar[str] = "DART: per pivot (image + text), keep the least cosine-similar image tokens"
    requires: ClassVar[frozenset[str]] = frozenset({"prompt", "prompt_keys"})
    #: DART computes its similarities on ``model.norm(hidden states)``: adapters apply the final norm.
    adapter_hints: ClassVar[frozenset[str]] = frozenset({HINT_FINAL_NORM})
    pivot_text: int = 4
    faithful: bool = False
    image_token_start_index: int = 35

    def __post_init__(self) -> None:
        if self.pivot_text < 0 or self.image_token_start_index < 0:
            raise ValueError("pivot_text and image_token_start_index must be >= 0")

    @property
    def exact_counts(self) -> bool:
        """Whether the kept count always equals the resolved budget (False under ``faithful``)."""
        return not self.faithful

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        keep = dart_supplement(
            signals.visual,
            signals.prompt,
            signals.prompt_keys,
            selected,
            counts,
            valid,
            signals.prompt_mask,
            scores,
            pivot_text_token=self.pivot_text,
            faithful=self.faithful,
            image_token_start_index=self.image_token_start_index,
        )
        return Supplement(keep)


@dataclass(frozen=True, eq=False)
class VisPrunerDiversity(DiversitySupplementer):
    """VisPruner's diverse tokens: the residual (descending-score order) shrunk by iterative
    even/odd matching, dropping up to 8 most duplicated tokens per round."""

    name: ClassVar[str] = "vispruner"
    description: ClassVar[str] = "VisPruner: remove duplicates from the residual by iterative even/odd cosine matching"

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        return Supplement(vispruner_supplement(signals.visual, scores, selected, counts, valid))


@dataclass(frozen=True, eq=False)
class RandPermDiversity(DiversitySupplementer):
    """``randperm`` of the remaining tokens with a per-row generator (the `random` baseline)."""

    name: ClassVar[str] = "randperm"
    description: ClassVar[str] = "seeded random tokens: the first k of randperm(remaining) per row (random baseline)"
    stochastic: ClassVar[Optional[bool]] = True
    seed: int = 0

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        return Supplement(random_select(valid & ~selected, counts, self.seed))


@dataclass(frozen=True, eq=False)
class PoolingDiversity(DiversitySupplementer):
    """Spatial average pooling to exactly the budget; each kept token is a window mean (merge-style).

    Uses the row's grid (`Signals.row_grids()`) when the row's real tokens form it, else pools the row as a 1-D sequence.
    Selected tokens (from a critical stage) are not excluded from the windows: combine with
    ``relevance.none``.
    """

    name: ClassVar[str] = "pooling"
    description: ClassVar[str] = "average pooling of the patch grid to the budget (window means at the top-left tokens)"

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        available = valid & ~selected
        if bool(selected.any()):  # pool the remaining tokens only, as a 1-D sequence
            keep, values = pooling_exact_select(signals.visual, None, counts, available)
        else:
            keep, values = pooling_exact_select(signals.visual, signals.row_grids(), counts, available)
        return Supplement(keep, values)


# -- budget ------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FastVBudget(AllCriticalBudget):
    """FastV's count: ``round(N * f)`` (Python round, half to even) for a kept fraction f = 1 - R."""

    name: ClassVar[str] = "fastv"
    description: ClassVar[str] = "FastV count round(N*(1-R)) (half to even) for a fraction; every token critical"
    rounding: ClassVar[str] = "half_even"


@dataclass(frozen=True, eq=False)
class PDropBudget(AllCriticalBudget):
    """PyramidDrop's count: ``int(N * f)`` (truncation) for a fraction; every token critical."""

    name: ClassVar[str] = "pdrop"
    description: ClassVar[str] = "PyramidDrop count int(N*ratio) (truncation) for a fraction; every token critical"
    #: PyramidDrop scores each stage with the stage layer's own input norm / q / k (``pdrop_forward``): the
    #: hint travels with this stage, so ``pdrop`` with another placement (experiments) keeps the rule.
    adapter_hints: ClassVar[frozenset[str]] = frozenset({HINT_OWN_LAYER})
    rounding: ClassVar[str] = "floor"


@dataclass(frozen=True, eq=False)
class VisionZipBudget(BudgetAllocator):
    """VisionZip's dominant/contextual split, ``dominant:contextual`` scaled to each row's total.

    Both count PATCH tokens (the CLS token is not part of ``visual``). ``keep_cls=True`` asks the
    adapter to keep the CLS token as well, in front, as the official code does (then the official
    64 tokens are budget 63 with ``dominant=53``).
    """

    name: ClassVar[str] = "visionzip"
    description: ClassVar[str] = "VisionZip split: critical = round(total * dominant / (dominant + contextual))"
    dominant: int = 54
    contextual: int = 10
    keep_cls: bool = False

    def __post_init__(self) -> None:
        if self.dominant < 0 or self.contextual < 0 or self.dominant + self.contextual == 0:
            raise ValueError("dominant and contextual must be >= 0 and not both 0")

    def allocate(self, totals: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Allocation:
        critical = scaled_counts(totals, self.dominant, self.dominant + self.contextual, rounding="half_up")  # (B,)
        return Allocation(total=totals, critical=critical)


@dataclass(frozen=True, eq=False)
class DivPruneRatio(BudgetAllocator):
    """DivPrune's count ``int(round(ratio * N))`` (half to even) for a fraction; nothing critical."""

    name: ClassVar[str] = "divprune_ratio"
    description: ClassVar[str] = "DivPrune count int(round(ratio*N)) (half to even) for a fraction; all to diversity"

    def allocate(self, totals: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Allocation:
        return Allocation(total=totals, critical=torch.zeros_like(totals))

    rounding: ClassVar[str] = "half_even"


@dataclass(frozen=True, eq=False)
class DartBudget(BudgetAllocator):
    """DART: ``pivot_image`` critical tokens (the image pivots), the rest to the pivots' picks."""

    name: ClassVar[str] = "dart"
    description: ClassVar[str] = "DART split: critical = min(pivot_image, total) image pivots"
    pivot_image: int = 4

    def __post_init__(self) -> None:
        if self.pivot_image < 0:
            raise ValueError(f"pivot_image must be >= 0, got {self.pivot_image}")

    def allocate(self, totals: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Allocation:
        return Allocation(total=totals, critical=totals.clamp(max=self.pivot_image))


@dataclass(frozen=True, eq=False)
class VisPrunerBudget(BudgetAllocator):
    """VisPruner's split: ``int(total * important_ratio)`` important (truncation), the rest diverse."""

    name: ClassVar[str] = "vispruner"
    description: ClassVar[str] = "VisPruner split: critical = int(total * important_ratio)"
    important_ratio: float = 0.5

    def __post_init__(self) -> None:
        _check_fraction("important_ratio", self.important_ratio)

    def allocate(self, totals: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Allocation:
        critical = scaled_counts(totals, self.important_ratio, rounding="floor")  # (B,) int() truncation
        return Allocation(total=totals, critical=critical)


# -- placement ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PreLLMClip(LayerPlacement):
    """``pre_llm`` plus the CLIP-space signals CDPruner needs (the adapter runs CLIP's projection
    heads and text tower). Same drop point as ``pre_llm``."""

    name: ClassVar[str] = "pre_llm_clip"
    description: ClassVar[str] = "pre_llm drop that also provides CLIP image/text embeddings (CDPruner)"
    provides: ClassVar[frozenset[str]] = PLACEMENT_SIGNALS["pre_llm_clip"]

    def drops(self, budget: int | float) -> tuple[Drop, ...]:
        return (Drop("pre_llm", None, budget),)


#: Registration order (kind by kind).
PEER_STAGES = (
    ClsAttentionRelevance,
    ClipTextRelevance,
    KeyNormRelevance,
    OfficialTopK,
    VisionZipMerge,
    DivPruneDiversity,
    DPPDiversity,
    DartDiversity,
    VisPrunerDiversity,
    RandPermDiversity,
    PoolingDiversity,
    FastVBudget,
    PDropBudget,
    VisionZipBudget,
    DivPruneRatio,
    DartBudget,
    VisPrunerBudget,
    PreLLMClip,
)
