"""PruneVid before the LLM (temporal segmentation, static/dynamic separation, temporal and spatial merging) and its
question-guided keep rule inside the LLM.

Visual-AI/PruneVid @ b12600c6, ``models/pllava/modeling_pllava.py`` (PLLaVA integration):

* ``merge_frames_dynamic``: the frames' mean tokens are clustered with ``cluster_dpc_knn(cluster_num=int(T *
  temporal_segment_ratio), k=7)``; ``refine_clusters`` makes every cluster one run of consecutive frames (each
  cluster keeps its longest runs, ties all kept; a cluster whose runs are all one frame long is dissolved; the
  other runs join the neighbouring run that is longer, the left one on ties, cluster 0 when there is none);
  ``segment_lengths`` cuts the frames where the refined label changes;
* per segment of W frames, per spatial position: ``(sum_t (sum_w cos(x_w, x_t) - 1)) / (W (W - 1))`` (mean cosine
  over ordered frame pairs) ``> tau`` marks a static position; static tokens are averaged over the segment and,
  when more than ``MAX_UNCLUSTERED`` (14), DPC-KNN clustered to ``int(S * cluster_ratio)`` means; each frame's
  dynamic tokens likewise (more than 14 -> ``int(D * cluster_ratio)`` means);
* ``elastic_cache.py`` ``VTPWindowCache.process_attention`` (inside the LLM at ``selected_layer``): of every static
  group and every frame's dynamic group the ``int(size * alpha)`` tokens with the highest attention stay. The
  groups reach that later drop as ``Signals.frame_span`` (the frames each merged token stands for):
  ``span_groups`` recovers them.

vtprune's token layout (docs/methods.md, "PruneVid"): a merged token sits at the position of its DPC-KNN centre
(static: in the segment's first frame; dynamic: in its frame); an unclustered static token at its position in the
segment's first frame. Maths in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .clustering import cluster_means, dpc_knn

__all__ = [
    "MAX_UNCLUSTERED",
    "DEFAULT_K",
    "PruneVidRow",
    "refine_segments",
    "segment_lengths",
    "temporal_segments",
    "static_positions",
    "prunevid_frames",
    "group_keep",
    "span_groups",
]

#: A group (static tokens of a segment, dynamic tokens of a frame) larger than this is DPC-KNN clustered
#: (official ``if feat.shape[1] > 14``).
MAX_UNCLUSTERED = 14
#: The official DPC-KNN neighbourhood (``k=7``) for frames and tokens.
DEFAULT_K = 7
#: Label of a run being re-assigned in ``refine_segments`` (official ``-1``).
_UNSET = -1


def _runs(labels: list[int]) -> list[tuple[int, int, int]]:
    """(label, start, end inclusive) of each maximal run of equal labels."""
    runs: list[tuple[int, int, int]] = []
    for i, label in enumerate(labels):
        if runs and runs[-1][0] == label:
            runs[-1] = (label, runs[-1][1], i)
        else:
            runs.append((label, i, i))
    return runs


def refine_segments(labels: list[int]) -> list[int]:
    """One row of the official ``refine_clusters``: frame labels where every cluster label keeps its longest runs
    (all of them when several tie; a cluster whose longest run is one frame keeps none) and the other runs, left to
    right, take the label of the longer neighbouring run (left on ties; cluster 0 when neither exists)."""
    refined = list(labels)
    longest: dict[int, int] = {}
    for label, start, end in _runs(labels):
        longest[label] = max(longest.get(label, 0), end - start + 1)
    for label, start, end in _runs(labels):
        if longest[label] == 1 or end - start + 1 != longest[label]:
            refined[start : end + 1] = [_UNSET] * (end - start + 1)
    n = len(refined)
    i = 0
    while i < n:
        if refined[i] != _UNSET:
            i += 1
            continue
        start = i
        while i < n and refined[i] == _UNSET:
            i += 1
        end = i - 1
        left_label, left_len = None, 0
        if start > 0:
            left_label = refined[start - 1]
            j = start - 1
            while j >= 0 and refined[j] == left_label:
                j -= 1
            left_len = start - 1 - j
        right_label, right_len = None, 0
        if end < n - 1:
            right_label = refined[end + 1]
            j = end + 1
            while j < n and refined[j] == right_label:
                j += 1
            right_len = j - end - 1
        if left_len > right_len:
            new = left_label
        elif right_len > left_len:
            new = right_label
        else:
            new = left_label if left_label is not None else right_label
        refined[start : end + 1] = [0 if new is None else new] * (end - start + 1)
    return refined


def segment_lengths(labels: list[int]) -> list[int]:
    """Lengths of the runs of equal consecutive labels (official ``segment_lengths`` of one row)."""
    return [end - start + 1 for _, start, end in _runs(labels)]


def temporal_segments(frame_means: Tensor, segment_ratio: float, k: int, generator: Optional[torch.Generator]) -> list[int]:
    """Segment lengths (summing to T) of one video from its frames' mean tokens (T, D): DPC-KNN over frames with
    ``max(1, int(T * segment_ratio))`` clusters and ``min(k, T)`` neighbours (official: ``int(T * ratio)`` and
    ``k``, which fail below one cluster / for ``k > T``), ``refine_segments``, ``segment_lengths``."""
    frames = frame_means.shape[0]
    clusters = min(frames, max(1, int(frames * segment_ratio)))
    labels, _ = dpc_knn(frame_means.float()[None], clusters, min(k, frames), generator=generator)  # (1, T)
    return segment_lengths(refine_segments(labels[0].tolist()))


def static_positions(window: Tensor, tau: float) -> Tensor:
    """(n,) bool: the static positions of a segment's frames (W, n, D): the mean cosine over ordered frame pairs,
    summed in the official order ``(sum_t (sum_w cos - 1)) / (W (W - 1))``, is ``> tau``. A one-frame segment is
    all dynamic (official: ``(cos(x, x) - 1) / 0``, NaN or -inf, i.e. dynamic, unless ``cos(x, x)`` rounds above 1).
    """
    width = window.shape[0]
    if width < 2:
        return torch.zeros(window.shape[1], dtype=torch.bool, device=window.device)
    normed = F.normalize(window.float(), p=2, dim=-1)  # (W, n, D)
    sims = torch.einsum("wnc,tnc->wtn", normed, normed)  # (W, W, n)
    mean_sim = (sims.sum(dim=0) - 1).sum(dim=0) / (width * (width - 1))  # (n,)
    return mean_sim > tau


@dataclass(frozen=True)
class PruneVidRow:
    """PruneVid's merge of one video's frame tokens (T * n of them, frame-major).

    Attributes:
        keep: (T * n,) bool, the positions holding a merged token.
        values: (T * n, D) float32, the merged value at each kept position.
        assignment: (T * n,) long, the kept position each token was merged into.
        groups: (T * n,) long, the group of each kept token (per segment: its static group, then one group per
            frame's dynamic tokens; in the official order), -1 elsewhere.
        segments: the segment lengths.
    """

    keep: Tensor
    values: Tensor
    assignment: Tensor
    groups: Tensor
    segments: list[int]


def _merge_groups(
    feats: Tensor, slots: Tensor, members: Tensor, cluster_ratio: float, k: int, generator: Optional[torch.Generator],
    out: PruneVidRow, group: int,
) -> None:
    """Merge G groups of the same size m at once: ``feats`` (G, m, D) their tokens (static: already averaged over the
    segment), ``slots`` (G, m) the position each would sit at, ``members`` (G, R, m) the positions merged into each
    token (R = the segment's frames for a static group, 1 for a frame's dynamic group); the groups are numbered
    ``group``, ``group + 1``, ... Clusters when ``m > MAX_UNCLUSTERED``: one batched DPC-KNN, whose (G, m) noise draw
    is the official G successive (1, m) draws (the CPU generator fills row after row)."""
    groups, count, dim = feats.shape
    if count > MAX_UNCLUSTERED:
        clusters = int(count * cluster_ratio)
        labels, centers = dpc_knn(feats, clusters, min(k, count), generator=generator)  # (G, m), (G, M)
        merged = cluster_means(feats, labels, clusters)  # (G, M, D)
        kept = slots.gather(1, centers)  # (G, M): the centre positions
        targets = kept.gather(1, labels)  # (G, m): the centre position of each token's cluster
    else:
        merged, kept, targets = feats, slots, slots
    out.values[kept.reshape(-1)] = merged.reshape(-1, dim)
    out.keep[kept] = True
    out.groups[kept] = group + torch.arange(groups, device=kept.device)[:, None]
    out.assignment[members] = targets[:, None, :].expand_as(members)


def prunevid_frames(
    tokens: Tensor, tau: float, cluster_ratio: float, segment_ratio: float, k: int = DEFAULT_K,
    generator: Optional[torch.Generator] = None,
) -> PruneVidRow:
    """PruneVid's merge of one video's frame tokens (T, n, D). The generator draws the DPC-KNN tie noise in the
    official call order (frames, then per segment its static group, then each frame's dynamic group). One loop over
    segments; a segment's frames (their dynamic groups have one size) are merged in one batched call."""
    frames, per_frame, dim = tokens.shape
    feats = tokens.float()  # (T, n, D)
    flat = frames * per_frame
    out = PruneVidRow(
        keep=torch.zeros(flat, dtype=torch.bool, device=tokens.device),
        values=torch.zeros(flat, dim, dtype=torch.float32, device=tokens.device),
        assignment=torch.full((flat,), -1, dtype=torch.long, device=tokens.device),
        groups=torch.full((flat,), -1, dtype=torch.long, device=tokens.device),
        segments=temporal_segments(feats.mean(dim=1), segment_ratio, k, generator),
    )
    spatial = torch.arange(per_frame, device=tokens.device)  # (n,)
    start, group = 0, 0
    for width in out.segments:
        window = feats[start : start + width]  # (W, n, D)
        static = static_positions(window, tau)  # (n,)
        frame_base = (start + torch.arange(width, device=tokens.device)) * per_frame  # (W,)
        where = spatial[static]  # (S,)
        _merge_groups(
            window[:, static].mean(dim=0)[None], (start * per_frame + where)[None], (frame_base[:, None] + where[None])[None],
            cluster_ratio, k, generator, out, group,
        )
        group += 1
        slots = frame_base[:, None] + spatial[~static][None]  # (W, n - S): each frame's dynamic positions
        _merge_groups(window[:, ~static], slots, slots[:, None], cluster_ratio, k, generator, out, group)
        group += width
        start += width
    return out


def group_keep(scores: Tensor, groups: Tensor, alpha: float) -> Tensor:
    """(M,) bool: of every group (``groups`` (M,) long, -1 = no group, never kept) the ``int(size * alpha)``
    tokens with the highest ``scores`` (M,) (official ``process_attention``; ties to the earlier token)."""
    keep = torch.zeros_like(groups, dtype=torch.bool)
    for group in torch.unique(groups[groups >= 0]).tolist():
        members = torch.nonzero(groups == group, as_tuple=False).squeeze(1)  # (m,)
        take = int(members.numel() * alpha)
        if take:
            order = torch.sort(scores[members].float(), descending=True, stable=True).indices[:take]  # (take,)
            keep[members[order]] = True
    return keep


def span_groups(span: Tensor) -> Tensor:
    """(M,) long: the PruneVid group of each token from its ``frame_span`` (M, 2) (first, last frame it stands for,
    (-1, -1) = none): a token standing for several frames is a static token of the segment starting at ``first``
    (group ``2 * first``); one standing for one frame ``t`` is a dynamic token of that frame (group ``2 * t + 1``);
    -1 for none. Exact for `prunevid_frames`' output: a static token stands for every frame of its segment (a static
    position needs two frames or more), a dynamic cluster only for its own frame."""
    first, last = span[:, 0], span[:, 1]  # (M,), (M,)
    groups = torch.where(last > first, 2 * first, 2 * first + 1)  # (M,)
    return torch.where(first >= 0, groups, torch.full_like(groups, -1))
