"""HoliTom (cokeshao/HoliTom @ e9b2972f): global temporal segmentation by dynamic programming
(``holitom/llava_arch.py`` ``select_static_windows``), temporal merging of static tokens
(``get_static_dynamic_features``), spatial merging (``merge_tokens_by_attention_density`` /
``merge_tokens_by_density`` / ``cluster_dpc_knn`` / ``merge_tokens_by_clustering``), and the inner-LLM merge
(``holitom/modeling_qwen2.py`` ``Qwen2Model_holitom.forward``, layer ``HOLITOM_k``).

One video row at a time, as a (T, n, D) stack of frames; docs/methods.md ("HoliTom") lists the deviations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .common import unit_rows
from .video import dpc_knn_scores

__all__ = [
    "HoliTomResult",
    "static_window_counts",
    "holitom_windows",
    "holitom_frames",
    "cluster_merge",
    "inner_merge",
    "DPC_K",
]

#: DPC-KNN neighbours in HoliTom (env ``K``, default 7; capped at the cluster count).
DPC_K = 7


@dataclass(frozen=True)
class HoliTomResult:
    """One row's HoliTom (outer-LLM) output over its (T, n) frame tokens: ``keep`` (T, n) bool, ``values``
    (T, n, D), ``assignment`` (T, n) long flat index ``t * n + s`` of the kept token merged into (-1 = dropped
    unmerged), ``windows`` the DP's (start, end) frame windows, ``ratio`` the retain ratio after static pruning."""

    keep: Tensor
    values: Tensor
    assignment: Tensor
    windows: list[tuple[int, int]]
    ratio: float


def static_window_counts(feature_sim: Tensor, tau: float) -> Tensor:
    """(T, T) float: for a window [s, e], (e - s) times the number of tokens whose consecutive-frame cosine stays
    above ``tau`` over the whole window (the tokens temporal merging removes); 0 for e <= s.

    ``feature_sim`` (T - 1, n): cosine of each token with the same position in the next frame."""
    t_len = feature_sim.shape[0] + 1
    above = (feature_sim > tau).float()  # (T - 1, n)
    # run[s, e, :] = prod_{t = s}^{e - 1} above[t]: a log-free running product via cumulative sums of failures
    fails = torch.cumsum(torch.cat([torch.zeros_like(above[:1]), 1 - above]), dim=0)  # (T, n)
    run = (fails[None, :, :] - fails[:, None, :]) == 0  # (T, T, n): [s, e] no failure in transitions s..e-1
    lengths = (torch.arange(t_len)[None, :] - torch.arange(t_len)[:, None]).clamp(min=0).to(feature_sim.device)  # (T, T)
    return run.float().sum(dim=-1) * lengths.float()


def holitom_windows(feature_sim: Tensor, tau: float, max_window: int) -> tuple[list[tuple[int, int]], float]:
    """The DP of ``select_static_windows``: frames split into consecutive windows maximising the tokens removed
    (`static_window_counts`); a window of one frame removes nothing. For frame i the candidates are "i alone"
    then windows of 2..min(i + 1, max_window) frames ending at i, a later candidate winning only when strictly
    better (float32 sums, as the official). Returns the windows in order and the total removed.

    The recurrence runs over frames (each frame needs the previous ones' optimum); each frame's candidates are one
    batched float32 numpy sum, its winner the first candidate reaching the maximum (``argmax``: first on ties) when
    that is strictly above "i alone" -- the official loop's strict ``>`` in candidate order. No torch op per cell."""
    counts = static_window_counts(feature_sim, tau).cpu().numpy()  # (T, T) float32
    t_len = feature_sim.shape[0] + 1
    # dp_ext[j + 1] = dp[j], dp_ext[0] = 0 (the official "dp[j] if j >= 0 else 0")
    dp_ext = np.zeros(t_len + 1, dtype=np.float32)  # (T + 1,)
    prev = [0] * t_len
    for i in range(t_len):
        best = dp_ext[i]  # "i alone": dp[i - 1] (0 for i = 0)
        best_j = i
        largest = min(i + 1, max_window)
        if largest >= 2:
            starts = i + 1 - np.arange(2, largest + 1)  # (S,) window starts j + 1, candidate order (size 2, 3, ...)
            values = dp_ext[starts] + counts[starts, i]  # (S,) float32 sums
            first = int(values.argmax())
            if values[first] > best:
                best, best_j = values[first], int(starts[first])
        dp_ext[i + 1] = best
        prev[i] = best_j
    windows = []
    i = t_len - 1
    while i >= 0:
        windows.append((prev[i], i))
        i = prev[i] - 1
    return windows[::-1], float(dp_ext[-1])


def cluster_merge(x: Tensor, cluster_num: int, beta: float, generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor, Tensor]:
    """DPC-KNN clustering of each group of ``x`` (G, n, D) into ``cluster_num`` centres (k = min(DPC_K, cluster_num),
    one (G, n) noise draw), centres sorted by index; every other token joins its nearest centre (distance of the DPC
    matrix, ties to the lower centre); a centre with members becomes ``beta * centre + (1 - beta) * mean(members)``.
    Returns (centres (G, c) long ascending, values (G, c, D), owner (G, n) long: the centre slot of each token)."""
    groups, n, _ = x.shape
    score, dist = dpc_knn_scores(x, min(DPC_K, cluster_num), generator)  # (G, n), (G, n, n)
    centres = score.topk(cluster_num, dim=-1).indices.sort(dim=-1).values  # (G, c)
    owner = dist.gather(2, centres.unsqueeze(1).expand(-1, n, -1)).argmin(dim=-1)  # (G, n)
    slots = torch.arange(cluster_num, device=x.device).expand(groups, -1)  # (G, c)
    owner.scatter_(1, centres, slots)
    is_centre = torch.zeros(groups, n, dtype=torch.bool, device=x.device).scatter_(1, centres, True)  # (G, n)
    member = F.one_hot(owner, cluster_num).to(x.dtype) * (~is_centre).unsqueeze(-1).to(x.dtype)  # (G, n, c)
    count = member.sum(dim=1).unsqueeze(-1)  # (G, c, 1)
    mean = torch.bmm(member.transpose(1, 2), x) / count.clamp(min=1)  # (G, c, D)
    centre_x = x.gather(1, centres.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (G, c, D)
    values = torch.where(count > 0, beta * centre_x + (1 - beta) * mean, centre_x)  # (G, c, D)
    return centres, values, owner


def _dynamic_counts(n: int, ratio: float, d: float) -> tuple[int, int]:
    """(dominant, contextual) of ``merge_tokens_by_attention_density``: ``round(ceil(n r) (1 - D))`` and the rest."""
    total = math.ceil(n * ratio)
    dominant = round(total * (1 - d))
    return dominant, total - dominant


def holitom_frames(
    tokens: Tensor,
    attention: Tensor,
    ratio: float,
    tau: float = 0.8,
    d: float = 0.0,
    beta: float = 0.6,
    max_window: int = 1024,
    generator: Optional[torch.Generator] = None,
) -> HoliTomResult:
    """HoliTom's outer-LLM merging on one video: ``tokens`` (T, n, D), ``attention`` (T, n) (dominant scores).

    The DP windows; in a window of several frames the tokens similar (> tau) across all its transitions are static
    and averaged over the window, then clustered (DPC-KNN) to ``round(n_static * r')`` merged tokens placed at their
    centre's position in the window's first frame; each frame's other (dynamic) tokens keep the top
    ``round(ceil(n_dyn r') (1 - d))`` by attention plus ``ceil(n_dyn r') -`` that many DPC-KNN centres of the rest
    (merged as above). ``r' = min(ratio / (1 - removed / (T n)), 1)``.
    """
    t_len, n, dim = tokens.shape
    device = tokens.device
    # official: F.cosine_similarity(normed[:-1], normed[1:]) of the L2-normalised tokens; each frame divided once
    units = unit_rows(F.normalize(tokens.float(), p=2, dim=-1), inplace=True)  # (T, n, D)
    feature_sim = (units[:-1] * units[1:]).sum(dim=-1)  # (T - 1, n)
    windows, removed = holitom_windows(feature_sim, tau, max_window) if t_len > 1 else ([(0, 0)], 0.0)
    total = t_len * n
    r = min(ratio / ((total - removed) / total), 1.0)
    keep = torch.zeros(t_len, n, dtype=torch.bool, device=device)
    values = tokens.clone()
    assignment = torch.full((t_len, n), -1, dtype=torch.long, device=device)
    flat = torch.arange(t_len * n, device=device).view(t_len, n)  # (T, n)
    for start, end in windows:
        size = end - start + 1
        if size == 1:
            static = torch.zeros(n, dtype=torch.bool, device=device)
        else:
            static = (feature_sim[start:end] > tau).all(dim=0)  # (n,)
        dyn_idx = torch.nonzero(~static, as_tuple=False).squeeze(1)  # (n_dyn,)
        frames_t = torch.arange(start, end + 1, device=device)  # (L,)
        dominant, contextual = _dynamic_counts(dyn_idx.numel(), r, d)
        if dominant > 0:
            top = attention[start : end + 1][:, dyn_idx].topk(dominant, dim=1).indices  # (L, dominant)
            pos = dyn_idx[top]  # (L, dominant)
            keep[frames_t.unsqueeze(1), pos] = True
            assignment[frames_t.unsqueeze(1), pos] = flat[frames_t.unsqueeze(1), pos]
        if contextual > 0:
            rest = torch.ones(size, dyn_idx.numel(), dtype=torch.bool, device=device)
            if dominant > 0:
                rest.scatter_(1, top, False)
            rest_local = torch.arange(dyn_idx.numel(), device=device).expand(size, -1)[rest].view(size, -1)  # (L, m)
            rest_pos = dyn_idx[rest_local]  # (L, m)
            centres, merged, owner = cluster_merge(tokens[frames_t.unsqueeze(1), rest_pos], contextual, beta, generator)
            centre_pos = rest_pos.gather(1, centres)  # (L, c)
            keep[frames_t.unsqueeze(1), centre_pos] = True
            values[frames_t.unsqueeze(1), centre_pos] = merged
            assignment[frames_t.unsqueeze(1), rest_pos] = flat[frames_t.unsqueeze(1), centre_pos.gather(1, owner)]
        static_idx = torch.nonzero(static, as_tuple=False).squeeze(1)  # (n_static,)
        cluster_num = round(static_idx.numel() * r)
        if size > 1 and cluster_num > 0:
            mean = tokens[start : end + 1][:, static_idx].mean(dim=0)  # (n_static, D)
            centres, merged, owner = cluster_merge(mean.unsqueeze(0), cluster_num, beta, generator)
            centres, merged, owner = centres[0], merged[0], owner[0]
            dest = flat[start, static_idx[centres[owner]]]  # (n_static,)
            keep[start, static_idx[centres]] = True
            values[start, static_idx[centres]] = merged
            assignment[frames_t.unsqueeze(1), static_idx.unsqueeze(0)] = dest.unsqueeze(0).expand(size, -1)
    return HoliTomResult(keep, values, assignment, windows, r)


def inner_merge(hidden: Tensor, scores: Tensor, keep_count: int) -> tuple[Tensor, Tensor, Tensor]:
    """HoliTom's inner-LLM merge on one row's visual hidden states ``hidden`` (n, D) with ``scores`` (n,) (head-mean
    attention of the last token): the top ``keep_count`` stay; every other token is averaged into its most
    cosine-similar kept token, one after another in position order (``t = (t + x) / 2``), which gives a kept token
    with m sources in order j = 1..m the weights ``2^-m`` (itself) and ``2^-(m - j + 1)`` (source j).
    Returns (keep (n,) bool, values (n, D), target (n,) long position each token went to)."""
    n = hidden.shape[0]
    top = scores.topk(keep_count).indices  # (k,)
    keep = torch.zeros(n, dtype=torch.bool, device=hidden.device)
    keep[top] = True
    others = torch.nonzero(~keep, as_tuple=False).squeeze(1)  # (m,) ascending
    target = torch.arange(n, device=hidden.device)
    values = hidden.clone()
    if others.numel() == 0:
        return keep, values, target
    src, dst = hidden[others], hidden[top]  # (m, D), (k, D)
    sim = (src @ dst.t()) / (src.norm(dim=-1, keepdim=True) * dst.norm(dim=-1, keepdim=True).t())  # (m, k)
    choice = sim.max(dim=-1).indices  # (m,)
    one_hot = F.one_hot(choice, top.numel()).long()  # (m, k)
    total = one_hot.sum(dim=0)  # (k,)
    rank = (one_hot.cumsum(dim=0) * one_hot).sum(dim=1)  # (m,) 1-based order of each source at its target
    src_w = torch.pow(2.0, -(total[choice] - rank + 1).to(torch.float64)).to(hidden.dtype)  # (m,)
    dst_w = torch.pow(2.0, -total.to(torch.float64)).to(hidden.dtype)  # (k,)
    merged = dst * dst_w.unsqueeze(1)  # (k, D)
    merged = merged.index_add(0, choice, src * src_w.unsqueeze(1))
    values[top] = merged
    target[others] = top[choice]
    return keep, values, target
