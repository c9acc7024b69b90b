"""PruneVid's stages (docs/methods.md, "PruneVid"): thin wrappers over `vtprune.strategies.functional.prunevid`.

Before the LLM, ``diversity.prunevid`` (with the adaptive ``budget.prunevid``) merges each video row: temporal
segments, static tokens averaged over their segment, DPC-KNN spatial clustering, merged values + assignment
through the merging output. Inside the LLM, ``placement.prunevid_layer`` runs a second drop at layer ``k`` with
``relevance.prunevid_plain_attention`` (max over heads and prompt tokens of the attention to each visual token,
before RoPE and without the causal mask as officially; ``relevance.prunevid_attention``: the model's own),
``diversity.prunevid_groups`` (``int(size * alpha)`` of every group of the first drop, read from
``Signals.frame_span``) and ``budget.prunevid_uncapped`` (adaptive, never caps).

Rows: a video row's frame tokens are those with ``frame_index >= 0`` (``Signals.frames`` (T, H, W)); tokens
outside the frames (newlines, ``frame_index`` -1) are kept as they are; a row without frames is one frame (a
one-frame segment: all dynamic, clustered).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional

import torch
from torch import Tensor

from vtprune.framework.hints import HINT_PLAIN_PROMPT
from vtprune.framework.signals import PLACEMENT_SIGNALS, Signals
from vtprune.framework.stages import (
    DiversitySupplementer,
    Drop,
    LayerPlacement,
    RelevanceScorer,
    Supplement,
)

from .budget import AllCriticalBudget, OwnCountAllocator
from .critical import TopKCritical
from .functional.prunevid import DEFAULT_K, group_keep, prunevid_frames, span_groups


__all__ = [
    "PruneVidMerge", "PruneVidBudget", "PruneVidAttention", "PruneVidPlainAttention", "PruneVidAlpha", "PruneVidGroups", "PruneVidGroupBudget",
    "PruneVidPlacement", "PRUNEVID_STAGES",
]


def _frame_positions(signals: Signals, b: int, free: Tensor) -> tuple[Tensor, Tensor]:
    """Row ``b``'s frame positions (T, n) (frame-major) and its other free positions (M,): with frames, the free
    tokens of ``frame_index >= 0`` / the rest; without, every free token is one frame."""
    frames = signals.row_frames()[b]
    real = torch.nonzero(free[b], as_tuple=False).squeeze(1)  # (R,)
    if frames is None or signals.frame_index is None:
        return real[None], real[:0]
    in_frames = signals.frame_index[b, real] >= 0  # (R,)
    inside, others = real[in_frames], real[~in_frames]
    t_len, h, w = frames
    if inside.numel() != t_len * h * w:
        raise ValueError(f"row {b}: {inside.numel()} free frame tokens, but Signals.frames says {t_len}x{h}x{w}")
    return inside.view(t_len, h * w), others


def _cap(keep: Tensor, assignment: Tensor, count: int) -> None:
    """Keep at most ``count`` of a row's kept tokens (``keep`` (N,), ``assignment`` (N,), in place): the largest
    merged tokens first (ties to the earlier position); tokens merged into a dropped one get -1."""
    kept = torch.nonzero(keep, as_tuple=False).squeeze(1)  # (m,)
    if kept.numel() <= count:
        return
    sizes = torch.bincount(assignment[assignment >= 0], minlength=assignment.numel())[kept]  # (m,) tokens merged into each
    order = torch.sort(-sizes, stable=True).indices  # (m,)
    dropped = kept[order[count:]]  # (m - count,)
    keep[dropped] = False
    assignment[torch.isin(assignment, dropped)] = -1


@dataclass(frozen=True, eq=False)
class PruneVidMerge(DiversitySupplementer):
    """PruneVid before the LLM: temporal segments (DPC-KNN over frame means, ``segment_ratio`` of T clusters,
    refined into runs), static positions (mean pairwise cosine ``> tau``) averaged over their segment, groups of
    more than 14 tokens DPC-KNN clustered to ``cluster_ratio`` of them (``k`` neighbours, tie noise from ``seed``).
    Keeps its own count; a row count below it keeps the largest merged tokens (docs/methods.md, "PruneVid")."""

    name: ClassVar[str] = "prunevid"
    description: ClassVar[str] = "PruneVid before the LLM: temporal segments, static tokens merged over time, DPC-KNN spatial merging"
    optional: ClassVar[frozenset[str]] = frozenset({"frames", "frame_index"})
    stochastic: ClassVar[Optional[bool]] = True
    #: The method keeps its own data-dependent count (at most ``counts``).
    exact_counts: ClassVar[bool] = False
    tau: float = 0.8
    cluster_ratio: float = 0.5
    segment_ratio: float = 0.25
    k: int = DEFAULT_K
    seed: int = 0

    def __post_init__(self) -> None:
        for field, value in (("cluster_ratio", self.cluster_ratio), ("segment_ratio", self.segment_ratio)):
            if not 0.0 < float(value) <= 1.0:
                raise ValueError(f"{field} must be in (0, 1], got {value!r}")
        if self.k < 1:
            raise ValueError(f"k (DPC-KNN neighbours) must be >= 1, got {self.k}")

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        visual = signals.visual
        keep = torch.zeros(valid.shape, dtype=torch.bool, device=valid.device)  # (B, N)
        values = visual.float().clone()  # (B, N, D)
        assignment = torch.full(valid.shape, -1, dtype=torch.long, device=valid.device)  # (B, N)
        free = valid & ~selected  # (B, N)
        for b in range(signals.batch_size):
            positions, others = _frame_positions(signals, b, free)  # (T, n), (M,)
            if positions.numel():
                generator = torch.Generator().manual_seed(self.seed)
                row = prunevid_frames(
                    visual[b, positions], self.tau, self.cluster_ratio, self.segment_ratio, self.k, generator,
                )
                flat = positions.reshape(-1)  # (T * n,)
                keep[b, flat] = row.keep
                values[b, flat] = row.values
                assignment[b, flat] = flat[row.assignment]
            keep[b, others] = True
            assignment[b, others] = others
            _cap(keep[b], assignment[b], int(counts[b]))
        return Supplement(keep & valid, values, assignment)


@dataclass(frozen=True, eq=False)
class PruneVidBudget(OwnCountAllocator):
    """Adaptive: the resolved total is an upper bound, all of it handed to ``diversity.prunevid``, which keeps its own
    count (docs/architecture.md, "Adaptive counts"). The budget is a cap, not a count: a budget of 1.0 (or one at or
    above the row's tokens) never caps the method and runs it as released, so no budget keeps a row whole
    (:meth:`covers` is None; keep-all takes the neutral ``diversity.prunevid(tau=1.0, cluster_ratio=1.0)``)."""

    name: ClassVar[str] = "prunevid"
    description: ClassVar[str] = "adaptive: PruneVid keeps its own count, at most the budget"

    def covers(self, budget: Any, totals: Tensor, valid_counts: Tensor) -> Optional[Tensor]:
        return None  # a cap: 1.0 runs the released method uncapped (docs/methods.md, "PruneVid")


@dataclass(frozen=True, eq=False)
class PruneVidAttention(RelevanceScorer):
    """PruneVid's question-guided score inside the LLM: for each visual token the largest attention any head of any
    prompt token pays it (official ``max`` over heads, then over the text queries after the video)."""

    name: ClassVar[str] = "prunevid_attention"
    description: ClassVar[str] = "max over heads and prompt tokens of the attention to each visual token (PruneVid in-LLM)"
    requires: ClassVar[frozenset[str]] = frozenset({"prompt_attention"})

    def score(self, signals: Signals) -> Tensor:
        attention = signals.prompt_attention.float()  # (B, H, T, N)
        if signals.prompt_mask is not None:
            attention = attention.masked_fill(~signals.prompt_mask[:, None, :, None], 0.0)  # (B, H, T, N)
        return attention.amax(dim=1).amax(dim=1)  # (B, N)


@dataclass(frozen=True, eq=False)
class PruneVidPlainAttention(PruneVidAttention):
    """PruneVid's official in-LLM score (``llama.py`` ``attn_weights_wo_pos`` of ``selected_layer``): the max over
    heads and prompt tokens of ``softmax(q k^T / sqrt(d))`` of the layer's query / key projections *before* RoPE,
    over every present token (no causal mask). Asks the adapter (hint ``plain_prompt_attention``) to compute
    ``prompt_attention`` that way."""

    name: ClassVar[str] = "prunevid_plain_attention"
    description: ClassVar[str] = "max over heads and prompt tokens of softmax(QK^T/sqrt(d)) before RoPE, no causal mask (official PruneVid in-LLM)"
    adapter_hints: ClassVar[frozenset[str]] = frozenset({HINT_PLAIN_PROMPT})


@dataclass(frozen=True, eq=False)
class PruneVidAlpha(AllCriticalBudget):
    """PruneVid's in-LLM count: a fraction ``alpha`` keeps ``int(n * alpha)`` (floor, at least one) of the n present
    tokens, all by the critical selector."""

    name: ClassVar[str] = "prunevid_alpha"
    description: ClassVar[str] = "no diversity share; fractions floored (PruneVid's int(size * alpha))"
    plans_from_totals: ClassVar[bool] = True

    rounding: ClassVar[str] = "floor"


def _check_alpha(alpha: float) -> None:
    if not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"alpha (fraction kept inside the LLM) must be in (0, 1], got {alpha!r}")


@dataclass(frozen=True, eq=False)
class PruneVidGroups(DiversitySupplementer):
    """PruneVid's in-LLM keep rule (official ``process_attention``): of every group of the first drop (a segment's
    static tokens, a frame's dynamic tokens; recovered from ``Signals.frame_span`` by ``span_groups``) the
    ``int(size * alpha)`` tokens with the highest scores stay (ties to the earlier token). Tokens standing for no
    frame (newlines) stay; a row with no frame token at all (an image, one frame for ``diversity.prunevid``, or no
    ``frame_span``) is one group. Keeps its own count (``budget.prunevid_uncapped``, which asks for every token); under
    another allocator its count is a cap (the best-scored picks stay). Without scores (``relevance.none``) each group
    keeps its first tokens by position."""

    name: ClassVar[str] = "prunevid_groups"
    description: ClassVar[str] = "PruneVid in-LLM: int(size * alpha) best-scored tokens of every static / dynamic group of the first drop"
    exact_counts: ClassVar[bool] = False
    alpha: float = 0.4

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        if scores is None:  # no relevance stage: each group's first tokens by position
            scores = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)  # (B, N)
        keep = torch.zeros(valid.shape, dtype=torch.bool, device=valid.device)  # (B, N)
        free = valid & ~selected  # (B, N)
        for b in range(signals.batch_size):
            present = torch.nonzero(free[b], as_tuple=False).squeeze(1)  # (M,)
            if signals.frame_span is None:
                groups = torch.zeros_like(present)  # (M,): one group
            else:
                groups = span_groups(signals.frame_span[b, present])  # (M,)
                if bool((groups < 0).all()):
                    groups = torch.zeros_like(present)  # no frame token: the first drop's one frame
                keep[b, present[groups < 0]] = True  # newlines / separators stay
            keep[b, present] |= group_keep(scores[b, present], groups, self.alpha)
            picked = torch.nonzero(keep[b], as_tuple=False).squeeze(1)  # (P,)
            cap = int(counts[b])
            if picked.numel() > cap:  # another allocator's count is a cap: the best-scored picks (ties: earlier)
                best = torch.sort(scores[b, picked].float(), descending=True, stable=True).indices[:cap]  # (cap,)
                keep[b] = False
                keep[b, picked[best]] = True
        return Supplement(keep & valid)


@dataclass(frozen=True, eq=False)
class PruneVidGroupBudget(OwnCountAllocator):
    """Adaptive, never caps: every present token is the upper bound and ``diversity.prunevid_groups`` keeps its own
    per-group count (the drop's budget is PruneVid's ``alpha``, which that stage holds)."""

    name: ClassVar[str] = "prunevid_uncapped"
    description: ClassVar[str] = "adaptive, uncapped: diversity.prunevid_groups keeps int(size * alpha) per group"

    def resolve(self, budget: int | float, valid_counts: Tensor) -> Tensor:
        return valid_counts.clone()

    def covers(self, budget: Any, totals: Tensor, valid_counts: Tensor) -> Optional[Tensor]:
        return None  # every row's total is all its tokens by design: ``alpha`` decides, and alpha = 1.0 keeps all


@dataclass(frozen=True, eq=False)
class PruneVidPlacement(LayerPlacement):
    """A ``pre_llm`` drop with the budget (PruneVid's merge), then one before decoder layer ``k`` keeping ``alpha``
    of every group of the merge by the prompt tokens' attention (+ ``critical``, ``diversity.prunevid_groups``,
    ``budget.prunevid_uncapped``). Official: ``selected_layer=10`` (the layer whose attention scores and after which
    the tokens go: our ``k - 1``, so ``k=11``), ``alpha=0.4``. ``score``: ``official`` = the official arithmetic
    (``relevance.prunevid_plain_attention``: before RoPE, no causal mask), ``model`` = the model's own attention
    (``relevance.prunevid_attention``: RoPE, causal mask)."""

    name: ClassVar[str] = "prunevid_layer"
    description: ClassVar[str] = "drop before the LLM with the budget, then before layer k keeping alpha by prompt attention (PruneVid)"
    provides: ClassVar[frozenset[str]] = PLACEMENT_SIGNALS["pre_llm"]
    k: int = 11
    alpha: float = 0.4
    score: Literal["official", "model"] = "official"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        _check_alpha(self.alpha)
        if self.score not in ("official", "model"):
            raise ValueError(f"score must be one of 'official', 'model', got {self.score!r}")

    def drops(self, budget: int | float) -> tuple[Drop, ...]:
        return (Drop("pre_llm", None, budget), Drop("layer", self.k, float(self.alpha)))

    def drop_pipeline(self, pipeline: Any, number: int) -> Any:
        if number == 0:
            return pipeline
        return dataclasses.replace(
            pipeline, relevance=PruneVidPlainAttention() if self.score == "official" else PruneVidAttention(), critical=TopKCritical(), diversity=PruneVidGroups(alpha=float(self.alpha)),
            budget=PruneVidGroupBudget(), preset=None,
        )


#: Registration order.
PRUNEVID_STAGES = (
    PruneVidMerge, PruneVidBudget, PruneVidAttention, PruneVidPlainAttention, PruneVidAlpha, PruneVidGroups, PruneVidGroupBudget, PruneVidPlacement,
)
