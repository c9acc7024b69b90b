"""Temporal video stages (issue 15): FastVID and HoliTom, thin wrappers over `functional.fastvid` /
`functional.holitom` (docs/methods.md, "FastVID" and "HoliTom").

Budget: the row's resolved count over its real tokens is the method's retention ratio ``r``
(``counts / valid``: a float budget f gives back f up to the count's rounding, an int budget K gives K / N); the
method then keeps its own (adaptive) count, reported by ``Selection.counts``. Newline / separator tokens
(``frame_index`` -1) are kept as they are and are not counted by the frame arithmetic. A row without frames
((0, 0, 0) or no ``frames``) is one frame of all its real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from vtprune.framework.budget import resolve_budget
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
from .functional.video import frame_attention, frame_positions, row_generator

__all__ = ["FrameAttention", "FastVIDMerge", "HoliTomMerge", "HoliTomBudget", "PreLLMThenLayer", "VIDEO_STAGES", "row_layout"]


def row_layout(signals: Signals, row: int, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Row ``row``'s frame layout: (positions (T, n) long of its frame tokens, others (M,) long of its real tokens
    outside the frames: newlines / separators). A row without frames is one frame of its real tokens."""
    frames = signals.row_frames()[row]
    real = valid[row]  # (N,)
    if frames is None:
        positions = torch.nonzero(real, as_tuple=False).squeeze(1).unsqueeze(0)  # (1, n)
        return positions, positions.new_zeros(0)
    index = signals.frame_index[row]  # (N,)
    positions = frame_positions(torch.where(real, index, torch.full_like(index, -1)), frames)  # (T, n)
    others = torch.nonzero(real & (index < 0), as_tuple=False).squeeze(1)  # (M,)
    return positions, others


def _keeps_all(counts: Tensor, free: Tensor, b: int, keep: Tensor, assignment: Tensor) -> bool:
    """A row whose count reaches its free real tokens keeps them all unchanged (as ``Pipeline.select`` does for a
    row alone), so a row is the same alone and in a batch."""
    if int(counts[b]) < int(free[b].sum()):
        return False
    keep[b] = free[b]
    assignment[b] = torch.where(free[b], torch.arange(free.shape[1], device=free.device), assignment[b])
    return True


def _ratio(counts: Tensor, valid: Tensor, row: int) -> float:
    return float(counts[row]) / max(int(valid[row].sum()), 1)


@dataclass(frozen=True, eq=False)
class FrameAttention(RelevanceScorer):
    """Per-frame attention scores: the head mean of ``attention`` (last prompt token) where the point gives it (in
    the LLM); otherwise, per frame, the attention each token receives in a parameter-free self-attention of the
    frame's tokens (`functional.video.frame_attention`), the stand-in for the vision tower's attention."""

    name: ClassVar[str] = "frame_attention"
    description: ClassVar[str] = "per-frame received self-attention of the visual tokens (LLM attention head mean where given)"

    def score(self, signals: Signals) -> Tensor:
        if signals.attention is not None:
            return signals.attention.float().mean(dim=1)  # (B, N)
        valid = signals.valid()  # (B, N)
        out = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)  # (B, N)
        for b in range(signals.batch_size):
            positions, _ = row_layout(signals, b, valid)  # (T, n)
            if positions.numel():
                out[b, positions] = frame_attention(signals.visual[b, positions])  # (T, n)
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
    stochastic: ClassVar[Optional[bool]] = True
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
        keep = torch.zeros(valid.shape, dtype=torch.bool, device=valid.device)  # (B, N)
        values = visual.clone()  # (B, N, D)
        assignment = torch.full(valid.shape, -1, dtype=torch.long, device=valid.device)  # (B, N)
        ranked = scores if scores is not None else torch.zeros(valid.shape, device=valid.device)  # (B, N)
        free = valid & ~selected  # (B, N)
        for b in range(signals.batch_size):
            if _keeps_all(counts, free, b, keep, assignment):
                continue
            positions, others = row_layout(signals, b, free)  # (T, n), (M,)
            if not positions.numel():
                continue
            tokens = visual[b, positions]  # (T, n, D)
            result = fastvid_frames(
                tokens, ranked[b, positions], tokens.float().mean(dim=1), _ratio(counts, valid, b),
                self.c, self.tau, self.d, self.p, self.beta, row_generator(self.seed, visual.device),
            )
            _scatter_row(keep, values, assignment, b, positions, others, result.keep, result.values, result.assignment)
        return Supplement(keep & valid, values, assignment)


@dataclass(frozen=True, eq=False)
class HoliTomMerge(DiversitySupplementer):
    """HoliTom. Before the LLM (no ``attention``): the DP windows of static tokens (``tau``, ``max_window``),
    static tokens averaged over their window then DPC-KNN merged, dynamic tokens kept by the relevance scores
    (``d``: share of them DPC-KNN merged instead), retain ratio raised by what temporal merging removed. Inside the
    LLM (``attention`` given): the top ``counts`` by score stay, every other token is averaged into its most similar
    kept token in position order (the official in-place running mean). ``beta``: centre weight; ``seed``: tie noise."""

    name: ClassVar[str] = "holitom"
    description: ClassVar[str] = "HoliTom: DP temporal windows + static/dynamic merging before the LLM; similarity merge inside it"
    stochastic: ClassVar[Optional[bool]] = True
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
        keep = torch.zeros(valid.shape, dtype=torch.bool, device=valid.device)  # (B, N)
        values = visual.clone()  # (B, N, D)
        assignment = torch.full(valid.shape, -1, dtype=torch.long, device=valid.device)  # (B, N)
        ranked = scores if scores is not None else torch.zeros(valid.shape, device=valid.device)  # (B, N)
        free = valid & ~selected  # (B, N)
        for b in range(signals.batch_size):
            if _keeps_all(counts, free, b, keep, assignment):
                continue
            if signals.attention is not None:  # the inner-LLM merge: every present token, newlines included
                real = torch.nonzero(free[b], as_tuple=False).squeeze(1)  # (n,)
                row_keep, row_values, target = inner_merge(visual[b, real], ranked[b, real], int(counts[b]))
                keep[b, real] = row_keep
                values[b, real] = row_values
                assignment[b, real] = real[target]
                continue
            positions, others = row_layout(signals, b, free)  # (T, n), (M,)
            if not positions.numel():
                continue
            result = holitom_frames(
                visual[b, positions], ranked[b, positions], _ratio(counts, valid, b), self.tau, self.d, self.beta,
                self.max_window, row_generator(self.seed, visual.device),
            )
            _scatter_row(keep, values, assignment, b, positions, others, result.keep, result.values, result.assignment)
        return Supplement(keep & valid, values, assignment)


@dataclass(frozen=True, eq=False)
class HoliTomBudget(BudgetAllocator):
    """Everything to the diversity stage; a float budget rounds half to even (Python ``round``, as HoliTom's
    ``round(length * (1 - r))`` in the LLM)."""

    name: ClassVar[str] = "holitom"
    description: ClassVar[str] = "no critical share; fractions rounded half to even (HoliTom's round)"
    plans_from_totals: ClassVar[bool] = True

    def allocate(self, totals: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Allocation:
        return Allocation(total=totals, critical=torch.zeros_like(totals))

    def resolve(self, budget: int | float, valid_counts: Tensor) -> Tensor:
        return resolve_budget(budget, valid_counts, rounding="half_even")


@dataclass(frozen=True, eq=False)
class PreLLMThenLayer(LayerPlacement):
    """A drop before the LLM with the budget, then one before decoder layer ``k`` keeping ``keep`` of the tokens
    present there (HoliTom: outer merging, then the inner merge at ``HOLITOM_k`` with ``keep = 1 - HOLITOM_r``).
    Signals: those of ``pre_llm`` at both drops, plus the layer signals at the second."""

    name: ClassVar[str] = "pre_llm_layer"
    description: ClassVar[str] = "drop before the LLM with the budget, then before layer k keeping `keep` of what is present"
    provides: ClassVar[frozenset[str]] = PLACEMENT_SIGNALS["pre_llm"]
    k: int = 18
    keep: float = 0.5

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")

    def drops(self, budget: int | float) -> tuple[Drop, ...]:
        return (Drop("pre_llm", None, budget), Drop("layer", self.k, self.keep))


#: Registration order.
VIDEO_STAGES = (FrameAttention, FastVIDMerge, HoliTomMerge, HoliTomBudget, PreLLMThenLayer)
