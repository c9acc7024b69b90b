"""LLaVA-PruMerge and PruMerge+ (Shang et al., arXiv 2403.15388): an adaptive count of CLS-attention outliers,
each kept token absorbing its key-nearest neighbours, the pruned rest summed into one extra token.

Official code: github.com/42Shawn/LLaVA-PruMerge @ 097c04116a58465e4bcb58cec44a94018a68ff1a,
``llava/model/multimodal_encoder/clip_encoder.py``: ``outlier_dectection``, ``complement_idx``,
``CLIPVisionTower.token_prune_merge_advanced`` (PruMerge) and ``token_prune_merge_advanced_plus`` (PruMerge+, the
one ``forward`` calls), both with ``if_adaptive=True``.

Rules reproduced, per image (what the official code does for its batch of one):

* signals: the queries and keys of the tower layer AFTER the feature layer (hooks on
  ``encoder.layers[23].self_attn.{q,k}_proj`` of the 24-layer CLIP-L: the layer that reads the penultimate
  features), as ONE head over the full width: ``attn = softmax(q k^T * D ** -0.5)`` with D the hidden size, the CLS
  row over the patches (the softmax runs over CLS + patches); keys = the full-width ``k_proj`` output of the patches.
  The adapters give them as ``cls_attention`` (B, 1, N) and ``visual_keys`` (B, N, H, d) (heads are concatenated
  back to the full width here) under the ``full_width_cls_attention`` hint.
* count (``outlier_dectection``): the attention in float32, ``Q1, Q3`` = the 25th / 75th percentiles (linear
  interpolation), outliers = ``attn > Q3 + 1.5 (Q3 - Q1)`` (the bound in float64: NumPy 1.x promotes the
  ``np.float32`` IQR times the Python float 1.5), ``ratio = m / n``, ``k = int(n * ratio)`` (Python floats: this
  is ``m - 1`` for some ``(m, n)``, e.g. ``(8, 49)``; kept as the official does).
* kept list: ``topk(attn, k)`` (descending attention, the official tie order). PruMerge+ appends the positions of
  ``arange(0, n - 1, int(int(1 / ratio) / 3))`` (the official ``575`` is ``n - 1`` of its 576 patches) that are not
  in the top-k, ascending.
* merge: for the i-th kept token, the candidates are all other tokens in the official order (the kept list without
  i, then the pruned tokens ascending); the ``neighbours`` (32) most cosine-similar by L2-normalised keys
  (``F.normalize``; ``bmm`` then ``topk``) are summed weighted by their attention (no normalisation) and added to
  the token. Every kept token is updated from the ORIGINAL values (simultaneous update). The operands are built in
  the official memory layout (keys gathered then normalised, row i of the kept block as the query, a fresh
  concatenation as the candidates): a CPU ``bmm`` can round differently for a differently aligned operand, which
  would flip tied neighbours.
* extra token: ``sum(attn_j * x_j)`` over the pruned tokens, appended after the kept list.

Deviations (docs/methods.md, PruMerge): the extra token is written at the row's last pruned position (a keep mask
has no slot outside the patches); the kept tokens are emitted in ascending position order (official: the kept
list order, extra token last; `prumerge_select(ranked=True)` gives that order as ranks, for ``order=official``); the count is computed per image (official: one ``m / (B n)`` over the flattened
batch, and PruMerge+ fails for B > 1); ``neighbours`` is clamped to ``n - 1`` (official raises); PruMerge+ with no
outlier keeps no spatial samples (official divides by zero); a ``cap`` below the official count keeps the first
``cap - 1`` of the kept list plus the extra token.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import CountLike, per_row_counts, row_positions, valid_or_all

__all__ = [
    "iqr_outlier_count", "prumerge_order", "prumerge_row", "prumerge_select", "PRUMERGE_NEIGHBOURS",
]

#: Neighbours each kept token absorbs (the official ``topk(cos_sim_matrix, k=int(32))``).
PRUMERGE_NEIGHBOURS = 32
#: Tukey's fence: outliers lie above ``Q3 + IQR_FENCE * (Q3 - Q1)`` (official ``upper_bound``).
IQR_FENCE = 1.5
#: Largest (centres, neighbours, D) temporary of the merge, in bytes: the merge runs in blocks of centres this size
#: so that no temporary grows with the kept count. Temporaries of a few MiB freed and re-requested on every call can
#: be handed back to the OS by the host allocator (glibc trims its heap top) and page-faulted in again: with the
#: per-centre concatenations and per-row index copies this cost up to ~40% of PruMerge's CPU time at N = 576,
#: D = 1024 (docs/performance.md). Any positive size gives the same values (each centre's sum is its own).
MERGE_BLOCK_BYTES = 1 << 20


def iqr_outlier_count(attention: Tensor) -> int:
    """Number of upper IQR outliers of a 1-D attention row (official ``len(outlier_indices)``).

    Args:
        attention: (n,) CLS attention of one image's patches.
    Returns: ``m = #{attn > Q3 + 1.5 (Q3 - Q1)}`` with float32 linear-interpolation percentiles (as ``np.percentile``
        of the float32 array) and the bound in float64 (NumPy 1.x scalar promotion).
    """
    values = attention.float()  # (n,)
    quartiles = torch.quantile(values, torch.tensor([0.25, 0.75], dtype=values.dtype, device=values.device))  # (2,)
    spread = quartiles[1] - quartiles[0]  # float32, as np.float32 - np.float32
    bound = quartiles[1].double() + IQR_FENCE * spread.double()
    return int((values.double() > bound).sum().item())


def prumerge_order(attention: Tensor, plus: bool = False) -> tuple[Tensor, int]:
    """The official kept list of one image and its outlier count.

    Args:
        attention: (n,) CLS attention of the image's patches.
        plus: PruMerge+: append the spatially uniform samples not among the top-k.
    Returns: ``(order, k)``: (L,) long positions in the official order (top-k by descending attention, then
        PruMerge+'s samples ascending) and ``k`` = the number of top-k tokens at its head.
    """
    n = int(attention.numel())
    outliers = iqr_outlier_count(attention)
    ratio = outliers / n
    k = int(n * ratio)
    top = torch.topk(attention.unsqueeze(0), k, dim=1, largest=True).indices[0]  # (k,) descending attention
    if not plus or outliers == 0:
        return top, k
    stride = max(int(int(1 / ratio) / 3), 1)
    samples = torch.arange(0, n - 1, stride, device=attention.device)  # (s,)
    extra = samples[~torch.isin(samples, top)]  # (s',) ascending, not already kept
    return torch.cat([top, extra]), k


def prumerge_row(
    hidden: Tensor,
    keys: Tensor,
    attention: Tensor,
    cap: Optional[int] = None,
    plus: bool = False,
    neighbours: int = PRUMERGE_NEIGHBOURS,
    out: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """PruMerge on one image.

    Args:
        hidden: (n, D) patch features (the projector input).
        keys: (n, dk) full-width keys of the scoring layer.
        attention: (n,) its CLS attention (softmax over CLS + patches, CLS column removed).
        cap: most tokens kept (the extra token included); None = the official count.
        plus: PruMerge+.
        neighbours: tokens merged into each kept token (clamped to n - 1).
        out: (n, D) holding ``hidden``'s values (not ``hidden`` itself), updated in place and returned as ``values``;
            None: a copy of ``hidden``.
    Returns:
        keep: (n,) bool, the kept list and the extra token's position (the last pruned one).
        values: (n, D) ``hidden`` with the kept tokens' merged values and the extra token's weighted sum.
        order: (L,) long, the kept list in the official order (the extra token not included).
    """
    n = hidden.shape[0]
    values = hidden.clone() if out is None else out  # (n, D)
    if cap is not None and cap <= 0:
        return torch.zeros(n, dtype=torch.bool, device=hidden.device), values, hidden.new_zeros(0, dtype=torch.long)
    order, _ = prumerge_order(attention, plus)  # (L,)
    if cap is not None and order.numel() + int(order.numel() < n) > cap:
        order = order[: max(cap - 1, 0)]  # room for the extra token
    keep = torch.zeros(n, dtype=torch.bool, device=hidden.device)
    keep[order] = True
    pruned = torch.nonzero(~keep, as_tuple=False).flatten()  # (R,) ascending (official complement_idx)
    weights = attention.to(hidden.dtype)  # (n,)
    listing = torch.cat([order, pruned])  # (n,) the kept list, then the pruned tokens ascending
    kept_count, width = order.numel(), min(neighbours, n - 1)
    # gathered, then normalised, in the official layout: the matmul result depends on the operands' memory layout
    kept_unit = F.normalize(keys[order], p=2, dim=-1)  # (L, dk)
    picks = []
    if kept_count and width > 0:
        # Candidates of the i-th kept token: the listing's unit keys without row i, in one contiguous (n - 1, dk)
        # buffer laid out as the official fresh torch.cat (same shape, strides and allocator alignment, so the bmm
        # rounds alike). Centre 0's candidates: the other kept tokens, then the pruned ones (normalised straight into
        # the buffer, F.normalize's own arithmetic). From centre i - 1 to centre i one slot changes (slot i - 1: kept
        # token i -> kept token i - 1), so each step copies one row where the official concatenates n - 1.
        rest_unit = keys.new_empty(1, n - 1, keys.shape[1])  # (1, n - 1, dk)
        rest_unit[0, : kept_count - 1] = kept_unit[1:]
        F.normalize(keys[pruned], p=2, dim=-1, out=rest_unit[0, kept_count - 1 :])  # (R, dk)
        for i in range(kept_count):
            if i:
                rest_unit[0, i - 1] = kept_unit[i - 1]
            similarity = torch.bmm(kept_unit[i].view(1, 1, -1), rest_unit.transpose(1, 2))  # (1, 1, n - 1)
            picks.append(torch.topk(similarity, k=width, dim=2, largest=True).indices.view(-1))  # (w,)
    if picks:
        local = torch.stack(picks)  # (L, w) indices into each centre's candidate list
        rows = torch.arange(local.shape[0], device=hidden.device).unsqueeze(1)  # (L, 1)
        nearest = listing[local + (local >= rows).long()]  # (L, w) positions: candidate j of centre i is listing[j + (j >= i)]
        scale = weights[nearest].unsqueeze(-1)  # (L, w, 1)
        # the (c, w, D) products in blocks of centres (each centre's sum is independent of the others in its block)
        block = max(1, MERGE_BLOCK_BYTES // max(1, width * hidden.shape[1] * hidden.element_size()))
        for start in range(0, order.numel(), block):
            centres = order[start : start + block]  # (c,)
            cluster = hidden[nearest[start : start + block]]  # (c, w, D)
            values[centres] = hidden[centres] + torch.sum(cluster * scale[start : start + block], dim=1)  # (c, D) unnormalised weighted sum
    pruned_hidden, pruned_weights = hidden[pruned], weights[pruned]  # (R, D), (R,)
    if pruned.numel():
        rest = pruned_hidden.unsqueeze(0)  # (1, R, D)
        extra = torch.sum(rest * pruned_weights.unsqueeze(0).unsqueeze(-1), dim=1, keepdim=True)  # (1, 1, D)
        values[pruned[-1]] = extra[0, 0]
        keep[pruned[-1]] = True
    return keep, values, order


def prumerge_select(
    visual: Tensor,
    cls_attention: Tensor,
    visual_keys: Tensor,
    caps: Optional[CountLike] = None,
    valid: Optional[Tensor] = None,
    plus: bool = False,
    neighbours: int = PRUMERGE_NEIGHBOURS,
    ranked: bool = False,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """PruMerge / PruMerge+ on a batch, each row's valid tokens as one image.

    Args:
        visual: (B, N, D) patch features.
        cls_attention: (B, H, N) CLS attention of the scoring layer (H = 1 under the adapter hint; several heads are
            summed).
        visual_keys: (B, N, Hk, dk) that layer's keys (heads concatenated back to the full width) or (B, N, dk).
        caps: int or (B,) most tokens kept per row (None: the official count).
        valid: (B, N) bool or None.
        plus: PruMerge+ (spatially uniform samples added).
        neighbours: tokens merged into each kept token.
        ranked: also return each kept token's place in the official output sequence.
    Returns:
        keep: (B, N) bool; values: (B, N, D) ``visual`` with the kept tokens' merged values; ranks: (B, N) long with
        ``ranked`` (the kept list in its order, top-k by descending attention then PruMerge+'s samples, then the
        extra token last; -1 at tokens not kept), else None.
    """
    batch, tokens, _ = visual.shape
    valid = valid_or_all(valid, batch, tokens, visual.device)
    keys = visual_keys.reshape(batch, tokens, -1)  # (B, N, Hk*dk): the full-width keys
    attention = cls_attention.sum(dim=1)  # (B, N)
    limits = per_row_counts(caps, batch) if caps is not None else [None] * batch
    keep = torch.zeros(batch, tokens, dtype=torch.bool, device=visual.device)
    values = visual.clone()
    ranks = torch.full((batch, tokens), -1, dtype=torch.long, device=visual.device) if ranked else None  # (B, N)
    for b, pos in enumerate(row_positions(valid)):
        if pos.numel() == 0:
            continue
        if pos.numel() == tokens:  # a whole row: its own views, merged straight into ``values``
            row_keep, _, order = prumerge_row(visual[b], keys[b], attention[b], limits[b], plus, neighbours, out=values[b])
            keep[b] = row_keep
        else:
            row_keep, row_values, order = prumerge_row(
                visual[b, pos], keys[b, pos], attention[b, pos], limits[b], plus, neighbours
            )
            keep[b, pos] = row_keep
            values[b, pos] = row_values
        if ranks is None:
            continue
        row_ranks = torch.full((pos.numel(),), -1, dtype=torch.long, device=visual.device)  # (n,)
        row_ranks[order] = torch.arange(order.numel(), device=visual.device)
        row_ranks[row_keep & (row_ranks < 0)] = order.numel()  # the extra token, last
        ranks[b, pos] = row_ranks
    return keep, values, ranks
