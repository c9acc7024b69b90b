"""FastVID (LunarShen/FastVID @ a40a109c, ``fastvid_llavaonevision/.../modeling_qwen2.py`` ``Qwen2Model.forward``,
the "FastVID" block): DySeg temporal segmentation, ATS salient tokens, density-based anchors merged per segment.

One video row at a time, as a (T, n, D) stack of frames; docs/methods.md ("FastVID") lists the deviations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .video import dpc_knn_scores

__all__ = ["FastVIDResult", "dyseg_segments", "fastvid_counts", "anchor_counts", "fastvid_frames", "DENSITY_K"]

#: Neighbours of the DPC-KNN density in FastVID (``topk(dist, k=4)``, the token itself included).
DENSITY_K = 4


@dataclass(frozen=True)
class FastVIDResult:
    """One row's FastVID output over its (T, n) frame tokens.

    keep: (T, n) bool; values: (T, n, D) merged values (read at kept tokens); assignment: (T, n) long, the flat
    frame-token index ``t * n + s`` of the kept token each token was merged into (itself when kept), -1 = dropped
    unmerged; segments: the DySeg segment lengths."""

    keep: Tensor
    values: Tensor
    assignment: Tensor
    segments: list[int]


def dyseg_segments(global_features: Tensor, c: int, tau: float) -> list[int]:
    """DySeg: segment lengths of T frames from their global features (T, D).

    Cosine of consecutive frames; cuts after the ``c - 1`` least similar transitions (capped at T - 1) and after
    every transition below ``tau``; segments are the runs between cuts."""
    t_len = global_features.shape[0]
    if t_len == 1:
        return [1]
    g = global_features.float()
    g = g / g.norm(dim=1, keepdim=True)  # (T, D)
    similarity = (g[:-1] * g[1:]).sum(dim=1)  # (T - 1,)
    by_rank = torch.topk(similarity, min(c - 1, t_len - 1), largest=False).indices
    by_tau = torch.nonzero(similarity < tau, as_tuple=False).squeeze(1)
    cuts = torch.unique(torch.cat([by_rank, by_tau])).sort().values
    bounds = F.pad(cuts, (1, 1), value=-1)
    bounds[-1] = t_len - 1
    return [int(v) for v in bounds.diff().tolist() if int(v) > 0]


def fastvid_counts(frame_tokens: int, ratio: float, d: float) -> tuple[int, int]:
    """(salient, context) tokens per frame: ``retain = int(n * ratio)``, ``salient = retain - int(retain * d)``."""
    retain = int(frame_tokens * ratio)
    salient = retain - int(retain * d)
    return salient, retain - salient


def anchor_counts(segments: list[int], context: int, p: int) -> list[int]:
    """Per frame, its anchor count: in a segment of L frames, the last frame and every p-th before it get
    ``context * L // ceil(L / p)`` anchors, the others none."""
    out: list[int] = []
    for length in segments:
        per_anchor = (context * length) // ((length + p - 1) // p)
        out.extend(per_anchor if (length - 1 - i) % p == 0 else 0 for i in range(length))
    return out


def _merge_into_anchors(anchors: Tensor, pool: Tensor, pool_units: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Anchors (G, k, D) absorb the pool (P, m, D) (P = G, or P = 1: one pool shared by every group): each pool token
    goes to its most cosine-similar anchor (``pool_units``: the pool divided by its norms, (P, m, D)); the anchor
    becomes ``w * anchor + (1 - w) * mean(assigned)``, ``w = max(1 / (count + 1), beta)``. Returns (values (G, k, D),
    choice (G, m) the anchor index of each pool token).

    The assigned tokens are summed by one ``index_add_`` over the (group, anchor) rows (O(G m D)) instead of a
    one-hot (G, k, m) x (G, m, D) product (O(G k m D)): the choices are the same, the means equal within float32
    rounding (another summation order; docs/methods.md, "FastVID")."""
    groups, k, dim = anchors.shape
    m = pool.shape[1]
    anchors_n = anchors / anchors.norm(dim=-1, keepdim=True)  # (G, k, D)
    choice = torch.bmm(pool_units.expand(groups, -1, -1), anchors_n.transpose(1, 2)).argmax(dim=2)  # (G, m)
    offsets = torch.arange(0, groups * k, k, device=choice.device)  # (G,) first row of each group
    slot = (choice + offsets[:, None]).view(-1)  # (G*m,) row g*k + j of the anchor each pool token joins
    count = torch.bincount(slot, minlength=groups * k).to(pool.dtype).view(groups, k, 1)  # (G, k, 1)
    sums = torch.zeros(groups * k, dim, dtype=pool.dtype, device=pool.device).index_add_(
        0, slot, pool.expand(groups, -1, -1).reshape(groups * m, dim)
    ).view(groups, k, dim)  # (G, k, D)
    weight = (1 / (count + 1)).clamp(min=beta)  # (G, k, 1)
    mean = sums / count.clamp(min=1)  # (G, k, D)
    return weight * anchors + (1 - weight) * mean, choice


def fastvid_frames(
    tokens: Tensor,
    salience: Tensor,
    global_features: Tensor,
    ratio: float,
    c: int = 8,
    tau: float = 0.9,
    d: float = 0.4,
    p: int = 4,
    beta: float = 0.6,
    generator: Optional[torch.Generator] = None,
) -> FastVIDResult:
    """FastVID on one video: ``tokens`` (T, n, D), ``salience`` (T, n) (ATS scores), ``global_features`` (T, D').

    Per frame ``int(n * ratio)`` retained: the top salient ones kept as they are, the rest chosen as density-peak
    anchors among the other (filtered) tokens. Single-frame segments: each frame's anchors absorb its own filtered
    tokens. Longer segments: anchor frames (see `anchor_counts`) pick their anchors by their own density scores and
    absorb the filtered tokens of the whole segment (a token feeds one anchor in every anchor frame; its reported
    assignment is the anchor frame closing its group of p frames). Non-anchor frames of a segment keep their salient
    tokens only.
    """
    t_len, n, dim = tokens.shape
    device = tokens.device
    segments = dyseg_segments(global_features, c, tau)
    salient_num, context = fastvid_counts(n, ratio, d)
    counts = anchor_counts(segments, context, p)
    keep = torch.zeros(t_len, n, dtype=torch.bool, device=device)
    values = tokens.clone()
    assignment = torch.full((t_len, n), -1, dtype=torch.long, device=device)
    flat = torch.arange(t_len * n, device=device).view(t_len, n)  # (T, n)

    salient = torch.topk(salience, salient_num, dim=1).indices  # (T, s)
    keep.scatter_(1, salient, True)
    rest_mask = ~keep  # (T, n)
    filtered_idx = torch.arange(n, device=device).expand(t_len, n)[rest_mask].view(t_len, n - salient_num)  # (T, m)
    rows = torch.arange(t_len, device=device).unsqueeze(1)  # (T, 1)
    filtered = tokens[rows, filtered_idx]  # (T, m, D)
    assignment[rows, salient] = flat[rows, salient]
    if context == 0 or n - salient_num == 0:
        return FastVIDResult(keep, values, assignment, segments)
    density_k = min(DENSITY_K, n - salient_num)
    score, _ = dpc_knn_scores(filtered, density_k, generator)  # (T, m)

    # single-frame segments (frames whose anchor count is the plain per-frame context count)
    single = [t for t, cnt in enumerate(counts) if cnt == context]
    if single:
        if len(single) == t_len:  # every segment one frame: no subset to index
            at, own, own_idx, own_score = rows, filtered, filtered_idx, score
        else:
            frames = torch.tensor(single, device=device)  # (F,)
            at, own, own_idx, own_score = frames[:, None], filtered[frames], filtered_idx[frames], score[frames]
        anchor_local = torch.topk(own_score, context, dim=-1).indices  # (F, context)
        merged, choice = _merge_into_anchors(
            own.gather(1, anchor_local.unsqueeze(-1).expand(-1, -1, dim)), own, own / own.norm(dim=-1, keepdim=True), beta,
        )  # (F, context, D), (F, m)
        pos = own_idx.gather(1, anchor_local)  # (F, context) positions in the frame
        keep[at, pos] = True
        values[at, pos] = merged
        assignment[at, own_idx] = flat[at, pos.gather(1, choice)]
        assignment[at, pos] = flat[at, pos]

    # multi-frame segments
    start = 0
    for length in segments:
        if length > 1:
            seg_counts = counts[start : start + length]
            k = min(seg_counts[-1], n - salient_num)
            targets = [start + i for i, cnt in enumerate(seg_counts) if cnt > context]
            if targets and k > 0:
                target_t = torch.tensor(targets, device=device)  # (A,)
                local = torch.topk(score[target_t], k, dim=-1).indices  # (A, k)
                pos = filtered_idx[target_t.unsqueeze(1), local]  # (A, k)
                anchors = tokens[target_t.unsqueeze(1), pos]  # (A, k, D)
                pool = filtered[start : start + length].reshape(1, -1, dim)  # (1, L*m, D): shared by the A anchor frames
                pool_units = pool / pool.norm(dim=-1, keepdim=True)  # (1, L*m, D), normalised once
                merged_seg, choice_seg = _merge_into_anchors(anchors, pool, pool_units, beta)
                keep[target_t.unsqueeze(1), pos] = True
                values[target_t.unsqueeze(1), pos] = merged_seg
                # report each pool token under the anchor frame closing its group of p frames
                owner = torch.tensor(
                    [next(j for j, t in enumerate(targets) if t >= start + i) for i in range(length)], device=device
                )  # (L,)
                m = n - salient_num
                owner_tok = owner.repeat_interleave(m)  # (L*m,)
                chosen = choice_seg[owner_tok, torch.arange(length * m, device=device)]  # (L*m,)
                dest = flat[target_t[owner_tok], pos[owner_tok, chosen]]  # (L*m,)
                seg_rows = torch.arange(start, start + length, device=device).repeat_interleave(m)  # (L*m,)
                assignment[seg_rows, filtered_idx[start : start + length].reshape(-1)] = dest
                assignment[target_t.unsqueeze(1), pos] = flat[target_t.unsqueeze(1), pos]
        start += length
    return FastVIDResult(keep, values, assignment, segments)
