"""Temporal token reduction on video rows: DyCoke's temporal token merging (TTM) in the prefill.

KD-TAO/DyCoke @ dd746349, ``llava/model/llava_arch.py`` ``dycole_ttm(image_feature, num_tokens_per_frame, merging_ratio)``
(called on the flattened (T*P, D) video features of LLaVA-OneVision before the single video newline is appended):

1. frames are taken in pairs (0, 1), (2, 3), ... (``range(0, T - 1, 2)``): the second frame of a pair keeps its
   ``int((1 - k) * P)`` tokens least cosine-similar to the *same position* of the first frame (similarity of the
   L2-normalised tokens), ``topk(largest=False)``;
2. then in groups of four (``range(0, T - 4, 4)``) frame ``i + 2`` is re-pruned against frame ``i`` the same way
   (raw cosine similarity), so frames ``i`` stay whole and ``i + 1``, ``i + 2``, ``i + 3`` are pruned. The loop's
   stop ``T - 4`` leaves frame ``i + 2`` of the last group of four whole (T = 32: frames 0, 4, ..., 28 and 30).

The kept tokens are the originals (DyCoke's "merging" drops the redundant tokens; nothing is averaged).

vtprune rules (docs/methods.md, "DyCoke"): a row's frame tokens are those with ``frame_index >= 0`` (frame-major,
``Signals.frames`` gives (T, H, W), P = H * W); tokens outside the frames (newlines, ``frame_index == -1``) are
always kept, as the official newline appended after TTM; a row without frames is one frame (nothing compared,
everything kept); ties go to the lower position (official ``topk``: unspecified); an odd last frame is kept whole
(official: the pair loop stops before it, so it is lost); fewer than five frames skip the group-of-four pass
(official: ``torch.stack`` of an empty list raises). Maths in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import unit_rows
from .video import frame_tokens

__all__ = ["DYCOKE_KEEP_TIER", "DyCokeTTM", "dycoke_reference_frames", "dycoke_keep_per_frame", "dycoke_ttm", "dycoke_ttm_count"]

#: Score tier of the tokens DyCoke's TTM keeps: kept tokens score ``DYCOKE_KEEP_TIER + x`` with x in [0, 1], the
#: others x alone (x = half the cosine dissimilarity to the reference frame, in [0, 1]), so ``score >= tier`` is
#: exactly the official kept set. Equal to MustDrop's ``PASS_TIER`` so ``budget.mustdrop_split`` reads it.
DYCOKE_KEEP_TIER = 2.0
#: The score offset of whole frames and tokens outside the frames above the kept pruned-frame tokens (max x).
_WHOLE_FRAME = 1.0


def dycoke_keep_per_frame(tokens_per_frame: int, k: float) -> int:
    """Tokens a pruned frame keeps: the official ``int((1 - k) * P)`` in Python float arithmetic."""
    return int((1 - k) * tokens_per_frame)


def dycoke_reference_frames(num_frames: int) -> list[int]:
    """Per frame, the frame it is compared with (-1: kept whole), following the official loops."""
    reference = [-1] * num_frames
    for i in range(0, num_frames - 1, 2):
        reference[i + 1] = i
    for i in range(0, num_frames - 4, 4):
        reference[i + 2] = i
    return reference


def dycoke_ttm_count(frames: tuple[int, int, int], k: float) -> int:
    """The official kept count of a (T, H, W) video's frame tokens (newlines not included)."""
    t_len, h, w = frames
    pruned = sum(1 for ref in dycoke_reference_frames(t_len) if ref >= 0)
    return (t_len - pruned) * h * w + pruned * dycoke_keep_per_frame(h * w, k)


@dataclass(frozen=True)
class DyCokeTTM:
    """Result of `dycoke_ttm`: ``keep`` (B, N) bool the official kept set (plus non-frame tokens), ``scores``
    (B, N) float tiered scores (``>= DYCOKE_KEEP_TIER`` exactly on ``keep``; 0 at padding)."""

    keep: Tensor
    scores: Tensor


def dycoke_ttm(
    visual: Tensor,
    frame_index: Optional[Tensor],
    frames: Sequence[Optional[tuple[int, int, int]]],
    valid: Tensor,
    k: float = 0.3,
) -> DyCokeTTM:
    """DyCoke's TTM on every row of ``visual`` (B, N, D): see the module docstring.

    Args:
        visual: (B, N, D) tokens; frame tokens frame-major where ``frame_index`` (B, N) >= 0.
        frames: per row (T, H, W) or None (not a video: one frame, all kept).
        valid: (B, N) bool real tokens.
        k: the fraction of a pruned frame's tokens dropped (DyCoke's ``dycoke_k``, default 0.3).
    """
    batch, tokens = visual.shape[:2]
    keep = valid.clone()  # (B, N): non-frame tokens and rows without frames keep everything
    scores = torch.where(valid, torch.full((batch, tokens), DYCOKE_KEEP_TIER + _WHOLE_FRAME, device=visual.device), torch.zeros((), device=visual.device))  # (B, N)
    for b, shape in enumerate(frames):
        if shape is None or frame_index is None:
            continue
        t_len, h, w = shape
        per_frame = h * w
        where = ((frame_index[b] >= 0) & valid[b]).nonzero().flatten()  # (T*P,) frame-major positions
        x = frame_tokens(visual[b], where.view(t_len, per_frame)).float()  # (T, P, D), a view when consecutive
        reference = torch.tensor(dycoke_reference_frames(t_len), dtype=torch.long, device=visual.device)  # (T,)
        sims = torch.zeros(t_len, per_frame, device=visual.device)  # (T, P)
        # pairs: every odd frame 2i + 1 against frame 2i, of the L2-normalised tokens; F.cosine_similarity's
        # per-vector division done once per frame (unit_rows), strided views instead of gathered copies
        pairs = t_len // 2
        if pairs:
            units = unit_rows(F.normalize(x[: 2 * pairs], p=2, dim=-1), inplace=True)  # (2 * pairs, P, D)
            sims[1 : 2 * pairs : 2] = (units[0::2] * units[1::2]).sum(dim=-1)  # (pairs, P)
        # groups of four: frame i + 2 against frame i (i = 0, 4, ...; the official stop T - 4), raw tokens
        quads = len(range(0, t_len - 4, 4))
        if quads:
            before, after = unit_rows(x[0 : 4 * quads : 4]), unit_rows(x[2 : 4 * quads : 4])  # (quads, P, D) each
            sims[2 : 4 * quads : 4] = (before * after).sum(dim=-1)  # (quads, P)
        pruned = reference >= 0  # (T,)
        count = dycoke_keep_per_frame(per_frame, k)
        order = sims.argsort(dim=1, stable=True)  # (T, P) ascending similarity, ties to the lower position
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(per_frame, device=visual.device).expand(t_len, -1))
        kept = ~pruned[:, None] | (rank < count)  # (T, P)
        dissimilarity = (1.0 - sims) / 2.0  # (T, P) in [0, 1]
        row_scores = torch.where(
            pruned[:, None],
            torch.where(kept, DYCOKE_KEEP_TIER + dissimilarity, dissimilarity),
            torch.full_like(dissimilarity, DYCOKE_KEEP_TIER + _WHOLE_FRAME),
        )  # (T, P)
        keep[b, where] = kept.flatten()
        scores[b, where] = row_scores.flatten()
    return DyCokeTTM(keep, scores)
