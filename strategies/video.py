"""Temporal video stages (issue 15): FastVID and HoliTom, thin wrappers over `functional.fastvid` /
`functional.holitom` (docs/methods.md, "FastVID" and "HoliTom").

Budget: the allocators ``budget.fastvid`` / ``budget.holitom`` are adaptive (``adaptive_counts``): the row's resolved
count over its real tokens is the method's retention ratio ``r`` (``counts / valid``: a float budget f gives back f up
to the count's rounding, an int budget K gives K / N), and the method keeps its own data-dependent count (segments,
windows), reported by ``Selection.counts``; the diversity stages declare ``exact_counts = False``. HoliTom's
inner-LLM merge is its own stage (``diversity.holitom_inner`` with ``relevance.attention``), run at the second drop
of ``placement.pre_llm_layer`` (`PreLLMThenLayer.drop_pipeline`). Newline / separator tokens
(``frame_index`` -1) are kept as they are and are not counted by the frame arithmetic. A row without frames
((0, 0, 0) or no ``frames``) is one frame of all its real tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional

import torch
from torch import Tensor

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

from .functional.fastvid import fastvid_frames
from .functional.holitom import holitom_frames, inner_merge
from .functional.video import frame_attention, frame_positions, frame_tokens, row_generator
from .budget import OwnCountAllocator
from .relevance import AttentionRelevance, LastTokenAttention

__all__ = [
    "FrameAttention",
    "FastVIDMerge",
    "FastVIDBudget",
    "HoliTomMerge",
    "HoliTomInner",
    "HoliTomBudget",
    "HoliTomLayerBudget",
    "PreLLMThenLayer",
    "DENSITY_VIDEO_STAGES",
    "row_layout",
]


def row_layout(signals: Signals, row: int, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Row ``row``'s frame layout: (positions (T, n) long of its frame tokens, others (M,) long of its real tokens
    outside the frames: newlines / separators). A row without frames, or whose frame grid is broken (``valid`` lacks
    some of its frame tokens, e.g. taken by a critical selector before), is one frame of its ``valid`` tokens."""
    frames = signals.row_frames()[row]
    real = valid[row]  # (N,)
    if frames is not None and int((real & (signals.frame_index[row] >= 0)).sum()) != frames[0] * frames[1] * frames[2]:
        frames = None  # broken frame grid: as adapters treat a grid with tokens already dropped
    if frames is None:
        positions = torch.nonzero(real, as_tuple=False).squeeze(1).unsqueeze(0)  # (1, n)
        return positions, positions.new_zeros(0)
    index = signals.frame_index[row]  # (N,)
    positions = frame_positions(torch.where(real, index, torch.full_like(index, -1)), frames)  # (T, n)
    others = torch.nonzero(real & (index < 0), as_tuple=False).squeeze(1)  # (M,)
    return positions, others


def _row_outputs(
    visual: Tensor, selected: Tensor, valid: Tensor, scores: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The buffers a per-row merging stage fills: keep (B, N) False, values (B, N, D) a copy of ``visual``,
    assignment (B, N) -1, the ranking scores (B, N) (zeros without a relevance stage) and the free real tokens."""
    keep = torch.zeros(valid.shape, dtype=torch.bool, device=valid.device)  # (B, N)
    values = visual.clone()  # (B, N, D)
    assignment = torch.full(valid.shape, -1, dtype=torch.long, device=valid.device)  # (B, N)
    ranked = scores if scores is not None else torch.zeros(valid.shape, device=valid.device)  # (B, N)
    return keep, values, assignment, ranked, valid & ~selected


def _ratio(counts: Tensor, valid: Tensor, row: int) -> float:
    return float(counts[row]) / max(int(valid[row].sum()), 1)


@dataclass(frozen=True, eq=False)
class FrameAttention(RelevanceScorer):
    """Per-frame attention scores: per frame, the attention each token receives in a parameter-free
    self-attention of the frame's tokens (`functional.video.frame_attention`), the stand-in for the vision tower's
    attention. Reads nothing but ``visual`` and the layout (``frames`` / ``frame_index`` where present, like ``grid``);
    a row without frames is one frame."""

    name: ClassVar[str] = "frame_attention"
    description: ClassVar[str] = "per-frame received self-attention of the visual tokens (vision-attention proxy)"
    optional: ClassVar[frozenset[str]] = frozenset({"frames", "frame_index"})

    def score(self, signals: Signals) -> Tensor:
        valid = signals.valid()  # (B, N)
        out = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)  # (B, N)
        for b in range(signals.batch_size):
            positions, _ = row_layout(signals, b, valid)  # (T, n)
            if positions.numel():
                out[b, positions] = frame_attention(frame_tokens(signals.visual[b], positions))  # (T, n)
        return out


def _scatter_row(
    keep: Tensor, values: Tensor, assignment: Tensor, b: int, positions: Tensor, others: Tensor,
    row_keep: Tensor, row_values: Tensor, row_assign: Tensor,
) -> None:
    """Write one row's frame-level result (T, n) back at its positions; newline tokens kept as themselves."""
    flat = positions.reshape(-1)  # (T*n,)
    keep[b, flat] = row_keep.reshape(-1)
    values[b, flat] = row_values.reshape(flat.numel(), -1).to(values.dtype)
    target = row_assign.reshape(-1)  # (T*n,)
    assignment[b, flat] = torch.where(target >= 0, flat[target.clamp(min=0)], torch.full_like(target, -1))
    keep[b, others] = True
    assignment[b, others] = others


@dataclass(frozen=True, eq=False)
class FastVIDMerge(DiversitySupplementer):
    """FastVID (LLaVA-OneVision path): DySeg segments (``c`` most dissimilar transitions plus those below ``tau``),
    per frame ``int(n r)`` retained of which ``int(retain d)`` density anchors and the rest salient by the relevance
    scores, anchors merged over their segment (``p``: anchor-frame stride, ``beta``: minimum anchor weight).
    Density ties broken by ``rand * 1e-6`` from a generator seeded with ``seed`` per row."""

    name: ClassVar[str] = "fastvid"
    description: ClassVar[str] = "FastVID: dynamic segmentation + salient tokens + density anchors merged per segment"
    optional: ClassVar[frozenset[str]] = frozenset({"frames", "frame_index"})
    stochastic: ClassVar[Optional[bool]] = True
    #: The method keeps its own per-frame / per-segment count (at most about the ratio): not exactly ``counts``.
    exact_counts: ClassVar[bool] = False
    c: int = 8
    tau: float = 0.9
    d: float = 0.4
    p: int = 4
    beta: float = 0.6
    seed: int = 0

    def __post_init__(self) -> None:
        if self.c < 1 or self.p < 1:
            raise ValueError(f"c and p must be >= 1, got c={self.c}, p={self.p}")
        if not 0.0 <= self.d <= 1.0 or not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"d and beta must be in [0, 1], got d={self.d}, beta={self.beta}")

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        visual = signals.visual
        keep, values, assignment, ranked, free = _row_outputs(visual, selected, valid, scores)
        for b in range(signals.batch_size):
            positions, others = row_layout(signals, b, free)  # (T, n), (M,)
            if not positions.numel():
                continue
            tokens = frame_tokens(visual[b], positions)  # (T, n, D)
            result = fastvid_frames(
                tokens, ranked[b, positions], tokens.float().mean(dim=1), _ratio(counts, valid, b),
                self.c, self.tau, self.d, self.p, self.beta, row_generator(self.seed, visual.device),
            )
            _scatter_row(keep, values, assignment, b, positions, others, result.keep, result.values, result.assignment)
        return Supplement(keep & valid, values, assignment)


@dataclass(frozen=True, eq=False)
class HoliTomMerge(DiversitySupplementer):
    """HoliTom before the LLM: the DP windows of static tokens (``tau``, ``max_window``), static tokens averaged over
    their window then DPC-KNN merged, dynamic tokens kept by the relevance scores (``d``: share of them DPC-KNN
    merged instead), retain ratio raised by what temporal merging removed. ``beta``: centre weight; ``seed``: tie
    noise. The inner-LLM merge is `HoliTomInner` (``placement.pre_llm_layer`` runs it at its second drop)."""

    name: ClassVar[str] = "holitom"
    description: ClassVar[str] = "HoliTom before the LLM: DP temporal windows + static/dynamic merging"
    optional: ClassVar[frozenset[str]] = frozenset({"frames", "frame_index"})
    stochastic: ClassVar[Optional[bool]] = True
    #: The method keeps its own count (windows, ceil / round per frame and window): not exactly ``counts``.
    exact_counts: ClassVar[bool] = False
    tau: float = 0.8
    d: float = 0.0
    beta: float = 0.6
    max_window: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.d <= 1.0 or not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"d and beta must be in [0, 1], got d={self.d}, beta={self.beta}")
        if self.max_window < 1:
            raise ValueError(f"max_window must be >= 1, got {self.max_window}")

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        visual = signals.visual
        keep, values, assignment, ranked, free = _row_outputs(visual, selected, valid, scores)
        for b in range(signals.batch_size):
            positions, others = row_layout(signals, b, free)  # (T, n), (M,)
            if not positions.numel():
                continue
            result = holitom_frames(
                frame_tokens(visual[b], positions), ranked[b, positions], _ratio(counts, valid, b), self.tau, self.d, self.beta,
                self.max_window, row_generator(self.seed, visual.device),
            )
            _scatter_row(keep, values, assignment, b, positions, others, result.keep, result.values, result.assignment)
        return Supplement(keep & valid, values, assignment)


@dataclass(frozen=True, eq=False)
class HoliTomInner(DiversitySupplementer):
    """HoliTom's inner-LLM merge (``Qwen2Model_holitom.forward`` at layer ``HOLITOM_k``): of each row's present
    tokens (newlines included) the top ``counts`` by the relevance scores (``relevance.attention``: head mean of the
    last token's attention) stay; every other token is averaged into its most similar kept token in position order
    (the official in-place running mean). Keeps exactly ``counts``."""

    name: ClassVar[str] = "holitom_inner"
    description: ClassVar[str] = "HoliTom inside the LLM: top tokens by attention stay, the rest merged into the most similar"

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        visual = signals.visual
        keep, values, assignment, ranked, free = _row_outputs(visual, selected, valid, scores)
        for b in range(signals.batch_size):
            if int(counts[b]) == 0:
                continue
            real = torch.nonzero(free[b], as_tuple=False).squeeze(1)  # (n,)
            row_keep, row_values, target = inner_merge(visual[b, real], ranked[b, real], int(counts[b]))
            keep[b, real] = row_keep
            values[b, real] = row_values
            assignment[b, real] = real[target]
        return Supplement(keep & valid, values, assignment)


@dataclass(frozen=True, eq=False)
class FastVIDBudget(OwnCountAllocator):
    """FastVID's count: the budget (rounded half up) gives the ratio; the method keeps ``int(n r)`` per frame of
    which the anchors are shared per segment, so at most the budget's frame share (newlines kept on top)."""

    name: ClassVar[str] = "fastvid"
    description: ClassVar[str] = "adaptive: the budget is FastVID's ratio; the method keeps its own per-segment count"


@dataclass(frozen=True, eq=False)
class HoliTomBudget(OwnCountAllocator):
    """HoliTom's count before the LLM: a float budget rounds half to even (Python ``round``) and gives the ratio; the
    method keeps its own count (static windows merged, ceil / round per frame and window)."""

    name: ClassVar[str] = "holitom"
    description: ClassVar[str] = "adaptive: the budget (rounded half to even) is HoliTom's ratio; the method keeps its own count"

    rounding: ClassVar[str] = "half_even"


@dataclass(frozen=True, eq=False)
class HoliTomLayerBudget(BudgetAllocator):
    """HoliTom's inner-LLM count: exactly ``round(length * keep)`` (half to even, as the official
    ``round(length * (1 - r))``), everything to the diversity stage."""

    name: ClassVar[str] = "holitom_layer"
    description: ClassVar[str] = "no critical share; fractions rounded half to even (HoliTom's inner-LLM round)"
    plans_from_totals: ClassVar[bool] = True

    def allocate(self, totals: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Allocation:
        return Allocation(total=totals, critical=torch.zeros_like(totals))

    rounding: ClassVar[str] = "half_even"


@dataclass(frozen=True, eq=False)
class PreLLMThenLayer(LayerPlacement):
    """A drop before the LLM with the budget, then one before decoder layer ``k`` keeping ``keep`` of the tokens
    present there (HoliTom: outer merging, then the inner merge at ``HOLITOM_k`` with ``keep = 1 - HOLITOM_r``).
    ``layer_step``: what selects at the second drop: ``holitom`` = HoliTom's inner-LLM merge (``relevance.last_attention``
    or ``relevance.attention`` by ``query`` + ``diversity.holitom_inner`` + ``budget.holitom_layer``, the pipeline's critical stage kept), ``same`` = the
    pipeline itself. ``query`` (``layer_step=holitom``): whose attention row scores the inner merge: ``last`` = the
    sequence's last real token (official ``[0, -1]``, ``relevance.last_attention``), ``prompt`` = the last prompt
    token (``relevance.attention``). Signals: those of ``pre_llm`` at the first drop, plus the layer signals at the
    second."""

    name: ClassVar[str] = "pre_llm_layer"
    description: ClassVar[str] = "drop before the LLM with the budget, then before layer k keeping `keep` (HoliTom's inner merge)"
    provides: ClassVar[frozenset[str]] = PLACEMENT_SIGNALS["pre_llm"]
    k: int = 18
    keep: float = 0.5
    layer_step: Literal["holitom", "same"] = "holitom"
    query: Literal["last", "prompt"] = "last"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")
        if self.layer_step not in ("holitom", "same"):
            raise ValueError(f"layer_step must be one of 'holitom', 'same', got {self.layer_step!r}")
        if self.query not in ("last", "prompt"):
            raise ValueError(f"query must be one of 'last', 'prompt', got {self.query!r}")

    def drops(self, budget: int | float) -> tuple[Drop, ...]:
        return (Drop("pre_llm", None, budget), Drop("layer", self.k, self.keep))

    def drop_pipeline(self, pipeline: Any, number: int) -> Any:
        if number == 0 or self.layer_step == "same":
            return pipeline
        return dataclasses.replace(
            pipeline, relevance=LastTokenAttention() if self.query == "last" else AttentionRelevance(),
            diversity=HoliTomInner(), budget=HoliTomLayerBudget(), preset=None,
        )


#: Registration order.
DENSITY_VIDEO_STAGES = (
    FrameAttention, FastVIDMerge, FastVIDBudget, HoliTomMerge, HoliTomInner, HoliTomBudget, HoliTomLayerBudget, PreLLMThenLayer,
)
