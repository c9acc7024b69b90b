"""MustDrop's token rules as pure functions (liuting20/MustDrop @ 909afa53).

Official code read:

* ``llava/model/multimodal_encoder/local_merge.py`` ``conditional_pooling`` / ``merge_wavg`` (vision stage,
  called by ``clip_encoder.py`` ``CLIPVisionModelAcc.custom_forward`` after CLIP layer 0 with
  ``threshold=0.8, window_size=(3, 3)``): the patch grid is cut into non-overlapping ``ws x ws`` windows; a
  window's similarity is the mean cosine similarity of its ``n = ws * ws`` tokens over the ``n (n - 1)``
  ordered pairs of different tokens (``sims * (1 - eye)``, summed, divided by ``n (n - 1)``); every window
  with similarity ``>= threshold`` is merged (``r`` = their count, ``topk(r)`` order); a merged window's
  first ``n - 1`` tokens (row-major inside the window) are summed into its last (bottom-right) token and the
  sum divided by the size ``n`` (``merge_wavg`` with unit sizes = the window mean).
* ``clip_encoder.py``, the key set: ``ceil(keep_rate * (N - 1))`` patches (``keep_rate = 0.08``) with the
  largest head-mean CLS attention of CLIP's last layer; they are never dropped in the LLM.
* ``llava/model/language_model/modelling_sparse_llama.py`` ``LlamaDynamicvitModel.dual_attention_filter``:
  with ``attn`` the head-mean softmax attention of the text tokens after the image to the image tokens
  (T, N), ``attn_sum = attn.sum(0)``, a token is dropped iff ``attn_sum < attn_sum.sum() * global_thr`` and
  ``attn.max(0) < individual_thr``; the kept set is then united with the key set.

Tie rules: the official ``topk`` calls leave ties implementation-defined; here every ranking is a stable
descending sort (ties to the lower index). The official merge count ``r`` is the batch minimum
(``.sum(dim=1).min()``); here it is per row, so a row's result does not depend on its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .ranking import top_k_mask

__all__ = [
    "PASS_TIER",
    "LocalMerge",
    "window_positions",
    "window_similarity",
    "local_merge",
    "local_merge_to_count",
    "dual_attention_keep",
    "cls_key_set",
    "dual_scores",
]

#: Score offset that marks a token the official rules keep (dual filter or key set): `dual_scores` gives
#: ``PASS_TIER + share`` to those and ``share`` (in [0, 1]) to the others, so ``score >= PASS_TIER`` <=> kept.
PASS_TIER = 2.0


@dataclass(frozen=True)
class LocalMerge:
    """The result of a local merge on a batch.

    Attributes:
        keep: (B, N) bool, the tokens that remain (a merged window's last token, unmerged tokens).
        values: (B, N, D) the token values after merging (a merged window's mean at its last token; other
            positions unchanged).
        assignment: (B, N) long, for every token the *position* of the token it is merged into or is (itself for
            a kept token); -1 for a token dropped without merging and for padding.
    """

    keep: Tensor  # (B, N) bool
    values: Tensor  # (B, N, D)
    assignment: Tensor  # (B, N) long


def window_positions(h: int, w: int, window: int, device: Optional[torch.device] = None) -> Tensor:
    """(G, window * window) long: the row-major token positions of each full ``window x window`` window of a
    row-major (h, w) grid, windows in row-major order. Tokens of a partial window at the right or bottom
    edge belong to no window (the official code asserts a divisible grid)."""
    gh, gw = h // window, w // window
    grid = torch.arange(h * w, device=device).reshape(h, w)[: gh * window, : gw * window]  # (gh*ws, gw*ws)
    blocks = grid.reshape(gh, window, gw, window).permute(0, 2, 1, 3)  # (gh, gw, ws, ws)
    return blocks.reshape(gh * gw, window * window)  # (G, n)


def window_similarity(tokens: Tensor, windows: Tensor) -> Tensor:
    """(G,) float: the official mean pairwise cosine similarity of each window.

    Args:
        tokens: (N, D) one row's tokens.
        windows: (G, n) token positions per window (`window_positions`).
    """
    n = windows.shape[1]
    feat = tokens[windows].float().transpose(1, 2).contiguous()  # (G, D, n): the official (b, gh, gw, c, n) layout
    sims = F.cosine_similarity(feat.unsqueeze(-1), feat.unsqueeze(-2), dim=1)  # (G, n, n)
    sims = sims * (1 - torch.eye(n, device=sims.device))  # (G, n, n) self-similarity removed
    return sims.sum(-1).sum(-1) / (n * (n - 1))  # (G,)


def _row_windows(count: int, grid: Optional[tuple[int, int]], window: int, device: torch.device) -> Tensor:
    if grid is None or grid[0] * grid[1] != count:
        return torch.zeros(0, window * window, dtype=torch.long, device=device)  # no grid: no window
    return window_positions(grid[0], grid[1], window, device)


def _merge_row(tokens: Tensor, windows: Tensor, order: Tensor, events: int) -> tuple[Tensor, Tensor, Tensor]:
    """Apply the first ``events`` merge events of one row: the windows in ``order``, each window's first n - 1
    tokens in turn into its last. Returns keep (N,), values (N, D), assignment (N,)."""
    count, n = tokens.shape[0], windows.shape[1]
    keep = torch.ones(count, dtype=torch.bool, device=tokens.device)  # (N,)
    assignment = torch.arange(count, device=tokens.device)  # (N,)
    values = tokens.clone()  # (N, D)
    full, part = divmod(events, n - 1)
    full = min(full, order.numel())
    part = part if full < order.numel() else 0
    groups = [(windows[order[:full]], n - 1)] if full else []  # (F, n) windows merged completely
    if part:
        groups.append((windows[order[full : full + 1]], part))  # (1, n) the next window, its first `part` tokens
    for chosen, taken in groups:
        src = chosen[:, :taken]  # (F, m)
        dst = chosen[:, n - 1]  # (F,)
        # official merge_wavg with unit sizes: (dst + sum of src) / size
        merged = (tokens[dst].float() + tokens[src].float().sum(1)) / (taken + 1)  # (F, D)
        values[dst] = merged.to(tokens.dtype)
        keep[src.flatten()] = False
        assignment[src.flatten()] = dst.repeat_interleave(taken)
    return keep, values, assignment


def local_merge(visual: Tensor, grids: Sequence[Optional[tuple[int, int]]], valid: Tensor, threshold: float = 0.8, window: int = 3) -> LocalMerge:
    """MustDrop's adaptive local merge, per row: every window with similarity ``>= threshold`` merged.

    Args:
        visual: (B, N, D) tokens, each row's real tokens first-to-last in row-major grid order.
        grids: per row its (h, w) grid or None (`Signals.row_grids()`); a row whose real token count is not
            ``h * w`` has no window (nothing merged).
        valid: (B, N) bool, the real tokens (a row's real tokens must be its first ones or any subset; they are
            taken in order).
    """
    return _merge_batch(visual, grids, valid, window, threshold=threshold, counts=None)


def local_merge_to_count(visual: Tensor, grids: Sequence[Optional[tuple[int, int]]], counts: Tensor, valid: Tensor, window: int = 3) -> LocalMerge:
    """The local merge continued to exactly ``counts[b]`` remaining tokens per row.

    Merge events, in order: the windows by descending similarity (ties to the lower window index), inside a
    window its first n - 1 tokens one by one into its last. The first ``real - counts[b]`` events are applied,
    so the last window may be merged partially (its mean over the merged tokens). With
    ``counts[b] = real - (n - 1) * r`` (r = windows at or above the threshold) this is exactly `local_merge`.
    When the events run out (fewer than ``counts[b]`` windows, or no grid), the remaining tokens are cut to
    ``counts[b]`` by size (tokens standing for more originals first, ties to the lower position), the cut
    ones dropped without merging (assignment -1).
    """
    return _merge_batch(visual, grids, valid, window, threshold=None, counts=counts)


def _merge_batch(visual: Tensor, grids: Sequence[Optional[tuple[int, int]]], valid: Tensor, window: int, threshold: Optional[float], counts: Optional[Tensor]) -> LocalMerge:
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    batch, tokens, _ = visual.shape
    keep = torch.zeros(batch, tokens, dtype=torch.bool, device=visual.device)  # (B, N)
    values = visual.clone()  # (B, N, D)
    assignment = torch.full((batch, tokens), -1, dtype=torch.long, device=visual.device)  # (B, N)
    for b in range(batch):
        pos = valid[b].nonzero().flatten()  # (n_b,) real positions
        row = visual[b, pos]  # (n_b, D)
        windows = _row_windows(pos.numel(), grids[b], window, visual.device)  # (G, n)
        sim = window_similarity(row, windows) if windows.numel() else torch.zeros(0, device=visual.device)  # (G,)
        order = torch.sort(sim, descending=True, stable=True).indices  # (G,)
        n = window * window
        if counts is None:
            events = int((sim >= threshold).sum()) * (n - 1)
        else:
            events = max(pos.numel() - int(counts[b]), 0)
        row_keep, row_values, row_assign = _merge_row(row, windows, order, events)
        if counts is not None and int(row_keep.sum()) > int(counts[b]):
            sizes = torch.bincount(row_assign, minlength=pos.numel()).float()  # (n_b,)
            cut = top_k_mask(sizes.masked_fill(~row_keep, float("-inf")).unsqueeze(0), counts[b : b + 1], row_keep.unsqueeze(0))[0]
            dropped = row_keep & ~cut  # (n_b,)
            row_assign = torch.where(dropped[row_assign], torch.full_like(row_assign, -1), row_assign)
            row_keep = cut
        keep[b, pos] = row_keep
        values[b, pos] = row_values
        assignment[b, pos] = torch.where(row_assign >= 0, pos[row_assign.clamp(min=0)], row_assign)
    return LocalMerge(keep=keep, values=values, assignment=assignment)


def dual_attention_keep(attention: Tensor, valid: Tensor, global_thr: float, individual_thr: float) -> Tensor:
    """(B, N) bool: the tokens MustDrop's dual-attention filter keeps.

    Args:
        attention: (B, H, T, N) softmax attention of T text tokens (rows) to the N image tokens, per head.
        valid: (B, N) bool, the real image tokens (padding is never kept and adds nothing to the sums).
    """
    attn = attention.float().mean(dim=1).masked_fill(~valid.unsqueeze(1), 0.0)  # (B, T, N) head mean
    attn_sum = attn.sum(dim=1)  # (B, N) global attention
    total = attn_sum.sum(dim=1, keepdim=True)  # (B, 1)
    candidate = (attn_sum < total * global_thr) & (attn.max(dim=1).values < individual_thr)  # (B, N) dropped
    return ~candidate & valid


def cls_key_set(cls_attention: Tensor, valid: Tensor, keep_rate: float) -> Tensor:
    """(B, N) bool: the ``ceil(keep_rate * real)`` real tokens with the largest head-mean CLS attention
    (MustDrop's key set; ties to the lower index)."""
    scores = cls_attention.float().mean(dim=1)  # (B, N)
    counts = torch.tensor([math.ceil(keep_rate * int(n)) for n in valid.sum(dim=1).tolist()], device=valid.device)  # (B,)
    return top_k_mask(scores, counts, valid)


def dual_scores(attention: Tensor, cls_attention: Optional[Tensor], valid: Tensor, global_thr: float, individual_thr: float, keep_rate: float) -> Tensor:
    """(B, N) float32: ``PASS_TIER`` for a token the official rules keep (dual filter or key set) plus its share
    of the row's global text attention (``attn_sum / attn_sum.sum()``, in [0, 1]), which orders tokens inside
    each tier. ``cls_attention`` None: no key set."""
    kept = dual_attention_keep(attention, valid, global_thr, individual_thr)  # (B, N)
    if cls_attention is not None and keep_rate > 0:
        kept = kept | cls_key_set(cls_attention, valid, keep_rate)
    attn_sum = attention.float().mean(dim=1).masked_fill(~valid.unsqueeze(1), 0.0).sum(dim=1)  # (B, N)
    total = attn_sum.sum(dim=1, keepdim=True)  # (B, 1)
    share = torch.where(total > 0, attn_sum / total.clamp(min=torch.finfo(attn_sum.dtype).tiny), torch.zeros_like(attn_sum))  # (B, N)
    return share + PASS_TIER * kept.float()  # (B, N)
