"""ToMe (Bolya et al., Token Merging: Your ViT But Faster, ICLR 2023): bipartite soft matching.

Official code: github.com/facebookresearch/ToMe @ af95e4b1, ``tome/merge.py`` (``bipartite_soft_matching``,
``merge_wavg``, ``merge_source``), ``tome/patch/timm.py`` (``ToMeBlock.forward``: merge between the attention and
the MLP, metric = the block's keys averaged over heads; ``ToMeAttention.forward``: proportional attention adds
``log(size)`` to the attention logits before the softmax), ``tome/utils.py`` (``parse_r``).

Rules reproduced:
* ``r = min(r, (t - protected) // 2)`` with ``protected = 1`` when the first token is a class token; r <= 0
  merges nothing.
* metric normalised by its L2 norm; set A = even positions (``::2``), set B = odd positions (``1::2``);
  ``scores = a @ b^T``; a class token's row is ``-inf``.
* ``node_max, node_idx = scores.max(-1)``; ``edge_idx = node_max.argsort(descending=True)``: the first r edges
  are merged (``src``), the rest stay (``unm``); ``dst_idx = node_idx[src_idx]``; with a class token ``unm_idx``
  is sorted ascending (class token first).
* merge output order: ``cat([unm, dst])`` (A's unmerged tokens in ``unm_idx`` order, then all of B in order);
  ``dst.scatter_reduce(src, reduce=mode)`` with ``include_self=True`` (the default).
* ``merge_wavg``: ``x = merge(x * size, "sum") / merge(size, "sum")``, sizes start at 1.
* ``merge_source``: the originals of each token, ``merge(source, "amax")`` on a one-hot matrix; here kept as an
  index vector (`merge_slots`: original token -> current slot), equal to ``source.argmax(1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .common import CountLike, per_row_counts, row_positions, valid_or_all

__all__ = [
    "Matching",
    "bipartite_matching",
    "merge_tokens",
    "merge_wavg",
    "merge_slots",
    "parse_r",
    "tome_reduce",
    "tower_merge_step",
]


@dataclass(frozen=True)
class Matching:
    """One bipartite soft matching over t tokens (``bipartite_soft_matching``'s closure data).

    Attributes:
        r: tokens removed (0 = nothing merged).
        tokens: t, the tokens before the merge.
        unm_idx: (B, t_a - r) long, unmerged tokens of set A (indices into A = even positions).
        src_idx: (B, r) long, merged tokens of set A.
        dst_idx: (B, r) long, the token of set B (odd positions) each src token merges into.
    """

    r: int
    tokens: int
    unm_idx: Tensor  # (B, t_a - r) long
    src_idx: Tensor  # (B, r) long
    dst_idx: Tensor  # (B, r) long


def bipartite_matching(metric: Tensor, r: int, class_token: bool = False) -> Matching:
    """``bipartite_soft_matching(metric, r, class_token)``: which tokens merge where.

    Args:
        metric: (B, t, C) similarity features (ToMe: the block's keys averaged over heads).
        r: tokens to remove; clamped to ``(t - protected) // 2``.
        class_token: token 0 is a class token: never merged, first in the output.
    """
    batch, tokens, _ = metric.shape
    protected = 1 if class_token else 0
    r = min(int(r), (tokens - protected) // 2)
    if r <= 0:
        empty = torch.zeros(batch, 0, dtype=torch.long, device=metric.device)
        unm = torch.arange((tokens + 1) // 2, device=metric.device).expand(batch, -1)  # (B, t_a)
        return Matching(0, tokens, unm, empty, empty)
    with torch.no_grad():
        norm = metric.norm(dim=-1, keepdim=True)  # (B, t, 1)
        a = metric[..., ::2, :] / norm[..., ::2, :]  # (B, t_a, C): each half normalised into its own contiguous copy
        b = metric[..., 1::2, :] / norm[..., 1::2, :]  # (B, t_b, C)
        scores = a @ b.transpose(-1, -2)  # (B, t_a, t_b)
        if class_token:
            scores[..., 0, :] = -torch.inf
        node_max, node_idx = scores.max(dim=-1)  # (B, t_a)
        edge_idx = node_max.argsort(dim=-1, descending=True)  # (B, t_a)
        unm_idx = edge_idx[..., r:]  # (B, t_a - r)
        src_idx = edge_idx[..., :r]  # (B, r)
        dst_idx = node_idx.gather(dim=-1, index=src_idx)  # (B, r)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]
    return Matching(r, tokens, unm_idx, src_idx, dst_idx)


def merge_tokens(x: Tensor, matching: Matching, mode: str = "mean") -> Tensor:
    """(B, t - r, C): the official ``merge(x, mode)`` closure: ``cat([unm, dst.scatter_reduce(src)])``."""
    if matching.r == 0:
        return x
    src, dst = x[..., ::2, :], x[..., 1::2, :]  # (B, t_a, C), (B, t_b, C)
    batch, _, channels = src.shape
    rows = torch.arange(batch, device=x.device)[:, None]  # (B, 1): whole-row copies (the official gathers, faster)
    unm = src[rows, matching.unm_idx]  # (B, t_a - r, C)
    src = src[rows, matching.src_idx]  # (B, r, C)
    dst = dst.scatter_reduce(-2, matching.dst_idx.unsqueeze(-1).expand(batch, matching.r, channels), src, reduce=mode)
    return torch.cat([unm, dst], dim=1)


def merge_wavg(x: Tensor, matching: Matching, size: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``merge_wavg``: size-weighted average. ``x`` (B, t, C), ``size`` (B, t, 1) or None (all 1).
    Returns the merged (B, t - r, C) tokens and their (B, t - r, 1) sizes."""
    if size is None:  # all sizes 1: x * 1 is x exactly, so the weighting multiply is skipped
        size = merge_tokens(torch.ones_like(x[..., 0, None]), matching, mode="sum")  # (B, t - r, 1)
        return merge_tokens(x, matching, mode="sum") / size, size
    x = merge_tokens(x * size, matching, mode="sum")
    size = merge_tokens(size, matching, mode="sum")
    return x / size, size


def merge_slots(slots: Tensor, matching: Matching) -> Tensor:
    """``merge_source`` as an index vector: ``slots`` (B, N0) long, the current slot (0..t-1) of every original
    token; returns each original token's slot after the merge (0..t-r-1), i.e. ``merge_source(...).argmax(1)``."""
    if matching.r == 0:
        return slots
    batch = slots.shape[0]
    t_a = (matching.tokens + 1) // 2
    t_b = matching.tokens // 2
    unmerged = t_a - matching.r
    device = slots.device
    new_a = torch.empty(batch, t_a, dtype=torch.long, device=device)  # (B, t_a): new slot of each A token
    new_a.scatter_(1, matching.unm_idx, torch.arange(unmerged, device=device).expand(batch, -1))
    new_a.scatter_(1, matching.src_idx, unmerged + matching.dst_idx)
    new_b = unmerged + torch.arange(t_b, device=device).expand(batch, -1)  # (B, t_b)
    new_slot = torch.stack([new_a[:, :t_b], new_b], dim=-1).reshape(batch, 2 * t_b)  # (B, 2 t_b) interleaved
    if t_a > t_b:
        new_slot = torch.cat([new_slot, new_a[:, t_b:]], dim=1)  # (B, t)
    return new_slot.gather(1, slots)


def tower_merge_step(
    hidden: Tensor, keys: Tensor, heads: int, r: int, size: Optional[Tensor], slots: Optional[Tensor], class_token: bool = True
) -> tuple[Tensor, Tensor, Tensor, int]:
    """One merging layer of ToMe in a vision tower (``ToMeBlock.forward`` between the attention and the MLP), batched
    over the tower's images / crops: one matching per round for the whole batch, no loop over tokens or rows.

    The metric is the layer's keys averaged over heads; one official round removes ``min(r, (t - protected) // 2)``
    tokens; when ``r`` is more than that (a derived schedule's last layer), further rounds run on the size-weighted
    mean keys of the merged tokens.

    Args:
        hidden: (B, t, D) the layer's tokens after the attention residual.
        keys: (B, t, heads * dh) the layer's keys (``k_proj`` output).
        heads: attention heads of the layer.
        r: tokens to remove in this layer (> 0).
        size: (B, t, 1) token sizes, or None (all 1: nothing merged yet).
        slots: (B, T0) long, the current slot of every original token, or None (the identity).
        class_token: token 0 is protected (CLIP); False for towers without one.
    Returns:
        the merged (B, t', D) tokens, their (B, t', 1) sizes, the (B, T0) slots after the merge, and the number
        of tokens removed (``t - t'``).
    """
    batch, tokens, _ = hidden.shape
    metric = keys.view(batch, tokens, heads, -1).mean(dim=2)  # (B, t, dh): k.mean(heads)
    if slots is None:
        slots = torch.arange(tokens, device=hidden.device).expand(batch, -1)  # (B, T0)
    left = int(r)
    while left > 0:  # one round (official) unless asked for more than half the tokens
        matching = bipartite_matching(metric, left, class_token=class_token)
        if matching.r == 0:
            break
        slots = merge_slots(slots, matching)
        if left > matching.r:  # the next round's metric: size-weighted mean keys of the merged tokens
            metric, _ = merge_wavg(metric, matching, size)
        hidden, size = merge_wavg(hidden, matching, size)  # (B, t - r, D), (B, t - r, 1)
        left -= matching.r
    if size is None:
        size = torch.ones_like(hidden[..., :1])  # (B, t, 1): nothing merged
    return hidden, size, slots, int(r) - left


def parse_r(num_layers: int, r: int | tuple[int, float] | list[int]) -> list[int]:
    """The official ``parse_r``: a constant r, an (r, inflection) schedule or an explicit list, per layer."""
    inflect = 0.0
    if isinstance(r, list):
        return list(r) + [0] * (num_layers - len(r)) if len(r) < num_layers else list(r)
    if isinstance(r, tuple):
        r, inflect = r
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1) if num_layers > 1 else 0.0
    return [int(min_val + step * i) for i in range(num_layers)]


def tome_reduce(
    visual: Tensor, counts: CountLike, metric: Optional[Tensor] = None, valid: Optional[Tensor] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe at one point: repeated bipartite soft matching on each row's valid tokens until ``counts[b]`` remain.

    Each round removes ``r = min(t - count, t // 2)`` tokens (no class token) with size-weighted averaging;
    the metric of a later round is the size-weighted average of the metric (``merge_wavg`` on the metric, as
    the merged keys' mean would be). A merged token is represented by its B-set destination, so every output
    token sits at one original position.

    Args:
        visual: (B, N, D) tokens; metric: (B, N, C) similarity features (default ``visual``).
        counts: int or (B,) tokens to keep per row (at most the row's valid tokens).
        valid: (B, N) bool or None.
    Returns:
        keep: (B, N) bool at the representative positions (exactly ``min(counts[b], valid)`` per row);
        values: (B, N, D) ``visual`` with each representative replaced by its group's size-weighted mean;
        assignment: (B, N) long, the representative position of every valid token, -1 at padding.
    """
    batch, tokens, _ = visual.shape
    valid = valid_or_all(valid, batch, tokens, visual.device)
    own = metric is None or metric is visual  # the tokens are their own metric: merged once per round
    metric = visual if metric is None else metric
    keep = torch.zeros(batch, tokens, dtype=torch.bool, device=visual.device)
    values = visual.clone()
    assignment = torch.full((batch, tokens), -1, dtype=torch.long, device=visual.device)
    wanted = per_row_counts(counts, batch)
    for b, pos in enumerate(row_positions(valid)):  # rows differ in valid tokens and rounds: one at a time
        n = int(pos.numel())
        target = max(0, min(int(wanted[b]), n))
        if n == 0 or target == 0:
            continue
        full = n == tokens  # every token valid: a view of the row, no gather
        x = (visual[b] if full else visual[b, pos]).unsqueeze(0).float()  # (1, n, D)
        m = x if own else (metric[b] if full else metric[b, pos]).unsqueeze(0).float()  # (1, n, C)
        size = None  # (1, t, 1) once merged; None = all 1
        rep = pos.unsqueeze(0)  # (1, t): original position representing each current token
        slots = torch.arange(n, device=visual.device).unsqueeze(0)  # (1, n)
        while x.shape[1] > target:
            t = x.shape[1]
            matching = bipartite_matching(m, min(t - target, t // 2))
            if matching.r == 0:
                break
            if not own:
                m, _ = merge_wavg(m, matching, size)
            x, size = merge_wavg(x, matching, size)
            m = x if own else m
            slots = merge_slots(slots, matching)
            rep = torch.cat([rep[:, ::2].gather(1, matching.unm_idx), rep[:, 1::2]], dim=1)  # a destination stays
        kept = rep[0]  # (target,)
        keep[b, kept] = True
        values[b, kept] = x[0].to(values.dtype)
        assignment[b, pos] = kept[slots[0]]
    return keep, values, assignment
