"""SparseVLM's stages (docs/methods.md, "SparseVLM"): text-rater relevance, the rank rule as an adaptive allocator,
token recycling as a merging diversity stage, and the ``sparse_layers`` placement. Thin wrappers over
`vtprune.strategies.functional.sparsevlm`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch
from torch import Tensor

from vtprune.framework.budget import Budget
from vtprune.framework.errors import BudgetError
from vtprune.framework.hints import HINT_APPEND_MERGED, HINT_INPUT_EMBEDDINGS
from vtprune.framework.signals import PLACEMENT_SIGNALS, Signals
from vtprune.framework.stages import (
    Allocation,
    BudgetAllocator,
    DiversitySupplementer,
    Drop,
    LayerPlacement,
    RelevanceScorer,
    Supplement,
)

from .functional.sparsevlm import OFFICIAL_SCALE_BIAS, rank_counts, rater_rows, recycle, scale_bias_for, text_raters

__all__ = ["HINT_APPEND_MERGED", "HINT_INPUT_EMBEDDINGS", "SparseRaters", "SparseRank", "SparseRecycle", "SparseLayers", "SPARSEVLM_STAGES"]

_RATER_SIGNALS = frozenset({"prompt", "prompt_mask", "prompt_attention"})


def _raters(signals: Signals) -> Tensor:
    """(B, T) bool: the text raters of each row (`functional.sparsevlm.text_raters`), chosen as the official code
    does from the decoder input embeddings (``input_visual`` over all the image's tokens, ``input_prompt``) when the
    pruning point gives them, so every drop of a forward reuses the same raters; else from this point's own
    ``visual`` / ``prompt`` (a stage used on its own, or an adapter that does not know the hint)."""
    prompt_valid = signals.prompt_mask if signals.prompt_mask is not None else torch.ones(
        signals.prompt.shape[:2], dtype=torch.bool, device=signals.prompt.device
    )
    if signals.input_visual is not None and signals.input_prompt is not None:
        visual_valid = signals.input_visual_mask if signals.input_visual_mask is not None else torch.ones(
            signals.input_visual.shape[:2], dtype=torch.bool, device=signals.input_visual.device
        )
        return text_raters(signals.input_visual, signals.input_prompt, visual_valid, prompt_valid)
    return text_raters(signals.visual, signals.prompt, signals.valid(), prompt_valid)


@dataclass(frozen=True, eq=False)
class SparseRaters(RelevanceScorer):
    """SparseVLM's visual scores: the mean over the text raters (prompt tokens whose ``softmax(v t^T)`` share is
    above the mean, from the decoder input embeddings when given: `_raters`) of their head-mean attention to each
    visual token (``prompt_attention``)."""

    name: ClassVar[str] = "sparsevlm_raters"
    description: ClassVar[str] = "SparseVLM: mean head-mean attention of the text raters (prompt tokens above the mean v.t share)"
    requires: ClassVar[frozenset[str]] = _RATER_SIGNALS
    adapter_hints: ClassVar[frozenset[str]] = frozenset({HINT_INPUT_EMBEDDINGS})

    def score(self, signals: Signals) -> Tensor:
        raters = _raters(signals)  # (B, T)
        rows = rater_rows(signals.prompt_attention, raters)  # (B, T, N)
        return rows.sum(1) / raters.sum(1, keepdim=True).clamp(min=1)  # (B, N)


@dataclass(frozen=True, eq=False)
class SparseRank(BudgetAllocator):
    """SparseVLM's rank rule, an adaptive count: critical = ``min(int(rank * scale + bias), n - 1)`` (all ``n``
    when ``n == rank``), rank = the matrix rank of the raters' attention rows; the recycled clusters
    (``int(m / 10) + 1`` for ``m = int(0.3 (n - kept)) + 1``) are the rest of the row's count.

    The budget is the target: with ``scale``/``bias`` unset (None) it selects the official pair (192 -> 13.5 / 0,
    128 -> 9 / 6, 64 -> 0.8 / 0); other budgets need both set (else `BudgetError`), except a budget asking for the whole
    row (an int >= its real tokens, a fraction >= 1), which keeps every token. The count never exceeds the row's real tokens.
    """

    name: ClassVar[str] = "sparsevlm_rank"
    description: ClassVar[str] = "SparseVLM rank rule: adaptive count min(int(rank*scale+bias), n-1) + recycled clusters; the budget picks the official scale/bias"
    requires: ClassVar[frozenset[str]] = _RATER_SIGNALS
    adapter_hints: ClassVar[frozenset[str]] = frozenset({HINT_INPUT_EMBEDDINGS})
    adaptive_counts: ClassVar[bool] = True
    scale: Optional[float] = None
    bias: Optional[float] = None

    def __post_init__(self) -> None:
        if (self.scale is None) != (self.bias is None):
            raise ValueError("sparsevlm_rank: set both scale and bias, or neither (None: the official pair of the budget)")
        if self.scale is not None and self.scale < 0:
            raise ValueError(f"scale must be >= 0, got {self.scale}")

    def resolve(self, budget: int | float, valid_counts: Tensor) -> Tensor:
        return valid_counts.clone()  # every real token is a candidate: the count is the rank rule's

    def scale_bias(self, budget: Budget) -> tuple[float, float]:
        """(scale, bias) for one row's budget: the parameters when set, else the official pair of the budget."""
        if self.scale is not None and self.bias is not None:
            return float(self.scale), float(self.bias)
        try:
            return scale_bias_for(budget)
        except ValueError as error:
            raise BudgetError(str(error)) from None

    @property
    def budget_settings(self) -> tuple[int, ...]:  # type: ignore[override]
        """The official targets when scale/bias are unset (every other budget but a covering one is a `BudgetError`)."""
        return tuple(sorted(OFFICIAL_SCALE_BIAS)) if self.scale is None else ()

    def covers(self, budget: Any, totals: Tensor, valid_counts: Tensor) -> Optional[Tensor]:
        """The budget is a setting: only one that is not an official target (scale/bias unset) and asks for every real
        token of the row (an int >= its count, a fraction >= 1) keeps the row whole (`Pipeline.select`'s keep-all
        rule); the official targets (64 / 128 / 192) and any budget with scale/bias set always run the rank rule."""
        rows = self._whole_rows(budget, valid_counts)
        return None if rows is None else torch.tensor(rows, dtype=torch.bool, device=totals.device)  # (B,)

    def _whole_rows(self, budget: Any, valid_counts: Tensor) -> Optional[list[bool]]:
        """:meth:`covers` as a list (None with scale/bias set)."""
        if self.scale is not None:
            return None
        per_row: Sequence = budget if isinstance(budget, Sequence) else [budget] * valid_counts.shape[0]
        official = [isinstance(b, int) and b in OFFICIAL_SCALE_BIAS for b in per_row]
        return [_covers_row(b, n) and not o for b, n, o in zip(per_row, valid_counts.tolist(), official)]

    def adapt(self, signals: Signals, budget: Any, totals: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Allocation:
        per_row: Sequence = budget if isinstance(budget, Sequence) else [budget] * totals.shape[0]
        skip = self._whole_rows(budget, valid.sum(dim=1)) or [False] * len(per_row)  # rows Pipeline.select keeps whole
        raters = _raters(signals)
        kept, clusters = [], []
        for b, row_budget in enumerate(per_row):  # the pair may differ per row
            if skip[b]:  # kept whole by the pipeline: no pair, no rank rule to evaluate
                kept.append(valid[b : b + 1].sum(-1).cpu())
                clusters.append(torch.zeros(1, dtype=torch.long))
                continue
            scale, bias = self.scale_bias(row_budget)
            k, c, _ = rank_counts(signals.prompt_attention[b : b + 1], raters[b : b + 1], valid[b : b + 1], scale, bias)
            kept.append(k)
            clusters.append(c)
        critical = torch.cat(kept).to(totals.device)  # (B,)
        return Allocation(total=torch.minimum(critical + torch.cat(clusters).to(totals.device), totals), critical=critical)

    def allocate(self, totals: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Allocation:
        raise NotImplementedError("sparsevlm_rank is adaptive: Pipeline.select calls adapt()")


def _covers_row(budget: Any, real_tokens: int) -> bool:
    """True when ``budget`` asks for every real token of the row (an int >= its count, a fraction >= 1): every
    preset keeps the whole row then, so keeping everything reproduces the unpruned model."""
    if isinstance(budget, bool):
        return False
    if isinstance(budget, float):
        return budget >= 1.0
    return isinstance(budget, int) and budget >= real_tokens


@dataclass(frozen=True, eq=False)
class SparseRecycle(DiversitySupplementer):
    """SparseVLM's token recycling: the top ``int(0.3 n) + 1`` pruned tokens by score are clustered (density
    peaks) into the asked number of groups and merged; each merged token sits at its cluster centre's position
    (the adapter appends it after the kept tokens: hint ``append_merged``)."""

    name: ClassVar[str] = "recycle"
    description: ClassVar[str] = "SparseVLM token recycling: cluster the top 30% pruned tokens and merge each cluster"
    adapter_hints: ClassVar[frozenset[str]] = frozenset({HINT_APPEND_MERGED})
    #: At most ``int(0.3 n) + 1`` tokens are recycled, so an allocator asking for more clusters gets fewer.
    exact_counts: ClassVar[bool] = False

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        ranked = scores if scores is not None else torch.zeros(valid.shape, device=valid.device)  # (B, N)
        keep, values, assignment = recycle(signals.visual, ranked, valid & ~selected, counts)
        return Supplement(keep, values, assignment)


@dataclass(frozen=True, eq=False)
class SparseLayers(LayerPlacement):
    """Drops before each of ``layers`` (SparseVLM's sparse layers + 1), every one with the requested budget:
    the target an adaptive allocator reads (``sparsevlm_rank``), or the count a plain allocator keeps.
    Defaults: SparseVLM's 2, 6, 15 of a 32-layer LLaVA-1.5 (`functional.sparsevlm.sparse_layers_for` derives
    them for other depths)."""

    name: ClassVar[str] = "sparse_layers"
    description: ClassVar[str] = "in-LLM drops before each of `layers`, each with the requested budget (SparseVLM)"
    provides: ClassVar[frozenset[str]] = PLACEMENT_SIGNALS["schedule"]
    layers: tuple[int, ...] = (3, 7, 16)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("layers must name at least one decoder layer")
        if any(k < 1 for k in self.layers) or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be strictly increasing and >= 1, got {list(self.layers)}")

    def drops(self, budget: int | float) -> tuple[Drop, ...]:
        return tuple(Drop("layer", k, budget) for k in self.layers)


#: Registration order.
SPARSEVLM_STAGES = (SparseRaters, SparseRank, SparseRecycle, SparseLayers)
