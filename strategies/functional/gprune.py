"""G-Prune (Jiang et al., AAAI 2025, arXiv 2501.02268): importance by information flow on a similarity graph.

Official code: github.com/jytmelon/G-Prune @ 762c63771212104958ddbc508d0c421e95adafc9,
``LLaVA-NeXT/llava/model/llava_arch.py``, ``prepare_inputs_labels_for_multimodal`` (the block after
``encode_images``). Per image, on the projected visual tokens ``x`` (n, D):

1. ``A = normalize(x) @ normalize(x).T`` (cosine similarity graph);
2. edges below ``similarity`` are cut (set to 0), the rest divided by ``temperature``; cut entries
   (``|A| < 1e-6``) get the logit ``CUT_LOGIT`` so the row-wise softmax gives them weight 0;
3. ``A = softmax(A, dim=1)`` (row-stochastic transition matrix), ``degree = (A > 0).sum(1)``;
4. ``A = A ** iterations`` (``matrix_power``): ``iterations`` steps of propagation;
5. ``score = (||x_i||)_i @ A / degree``: every token's norm (its information) flows along the graph; a
   token's score is what reaches it, divided by its own degree (hubs of near-duplicates are discounted).

The official code then keeps ``topk(int(keep_ratio * n))`` (the `gprune` preset: ``critical.topk_official`` and
``budget.gprune``). This module is the score only, one row at a time on the row's real tokens, so a row gives the
same scores alone as in any batch (padding is never part of a graph).

Views (``Signals.view_index``): the official code exists for LLaVA-NeXT only, where an image is two views, the base
image (576 tokens) and the high-resolution crops without their newline tokens; it builds one graph per view, keeps
``topk(int(keep_ratio * n_v))`` of each view and every newline token, and emits them in ascending position. A row of
several views (or with tokens of no view, the newlines) is scored by `gprune_view_keys`: each view's own graph, then
each token's rank in its view as the key ``-(rank + 1) / n_v`` (newlines 0, above every view token). The top
``sum_v int(f * n_v) + newlines`` keys (`gprune_view_count`) are then exactly the official per-view top
``int(f * n_v)`` plus the newlines: a kept token has ``(rank + 1) / n_v <= f``, a dropped one ``> f``. A row of one
view without such tokens (LLaVA-1.5, whose official path is not written) keeps the G-Prune score itself.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .common import valid_rows

__all__ = ["CUT_LOGIT", "CUT_EPS", "gprune_scores", "gprune_row_scores", "gprune_view_keys", "gprune_view_count"]

#: The logit the official code gives a cut edge (``A[abs(A) < 1e-6] = -5000``): exp(-5000 - max) underflows to an
#: exact 0 in fp16 / bf16 / fp32, so a cut edge carries no flow and does not count in the degree.
CUT_LOGIT = -5000.0
#: The official test for a cut edge after the temperature division (``abs(A) < 1e-6``).
CUT_EPS = 1e-6


def gprune_row_scores(features: Tensor, similarity: float, temperature: float, iterations: int) -> Tensor:
    """(n,) float32: G-Prune's propagated importance of the n tokens of one image.

    Args:
        features: (n, D) the image's visual tokens (the projector output at ``pre_llm``).
        similarity: edges with cosine similarity below it are cut (official 0.5).
        temperature: the softmax temperature of the transition matrix (official 0.03).
        iterations: propagation steps, the power of the transition matrix (official 5).
    Computed in float32, in the official op order.
    """
    x = features.float()  # (n, D)
    if x.shape[0] == 0:
        return x.new_zeros(0)
    unit = torch.nn.functional.normalize(x, p=2, dim=1)  # (n, D)
    graph = unit @ unit.t()  # (n, n) cosine similarity
    graph.masked_fill_(graph < similarity, 0)  # cut the weak edges (official A[A < similarity] = 0, one op)
    graph.div_(temperature)  # (n, n), in place (the official A / temperature, same values)
    graph.masked_fill_(graph.abs() < CUT_EPS, CUT_LOGIT)  # official A[abs(A) < 1e-6] = -5000
    graph = torch.softmax(graph, dim=1)  # (n, n) row-stochastic
    degree = (graph > 0).sum(dim=1)  # (n,) long
    graph = torch.matrix_power(graph, iterations)  # (n, n)
    weight = torch.norm(x, dim=-1).view(1, -1)  # (1, n) every token's information
    flow = weight @ graph  # (1, n) what reaches each token
    return (flow / degree).flatten()  # (n,)


def gprune_view_keys(features: Tensor, views: list[Tensor], similarity: float, temperature: float, iterations: int) -> Tensor:
    """(n,) float32: the per-view rank keys of one row of n tokens (module docstring, "Views"); tokens in no view
    (newlines, and padding) get 0, above every view token.

    Args:
        features: (n, D) the row's tokens (only the views' are read).
        views: per view, (n_v,) long positions of its tokens (one graph each, `gprune_row_scores`).
        similarity, temperature, iterations: as in `gprune_row_scores`.
    A view's ranks follow ``torch.topk`` on its scores (the official tie order). Raises ``ValueError`` when two views
    are too large for float32 to keep the keys of different views apart (``n_a * n_b >= 2 / eps``).
    """
    sizes = sorted((int(v.numel()) for v in views), reverse=True)
    if len(sizes) > 1 and sizes[0] * sizes[1] * torch.finfo(torch.float32).eps >= 2:
        raise ValueError(f"gprune: views of {sizes[0]} and {sizes[1]} tokens are too large for float32 rank keys")
    keys = torch.zeros(features.shape[0], dtype=torch.float32, device=features.device)  # (n,)
    for positions in views:
        scores = gprune_row_scores(features[positions], similarity, temperature, iterations)  # (n_v,)
        order = torch.topk(scores, scores.numel()).indices  # (n_v,) descending, the official topk order
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)  # (n_v,)
        keys[positions] = (-(rank + 1).double() / positions.numel()).float()  # (n_v,) in [-1, 0)
    return keys


def gprune_view_count(fraction: float, view_sizes: list[int], free: int) -> int:
    """The official kept count of a row of views: ``sum_v int(fraction * n_v)`` (each view's truncated share, as the
    official ``topk(int(keep_ratio * n))``) plus the ``free`` tokens of no view (newlines, always kept)."""
    return sum(int(fraction * n) for n in view_sizes) + free


def gprune_scores(
    visual: Tensor,
    valid: Optional[Tensor],
    similarity: float,
    temperature: float,
    iterations: int,
    views: Optional[Tensor] = None,
) -> Tensor:
    """(B, N) float32: per row, `gprune_row_scores` of its real tokens (one graph), or with ``views`` (B, N) long
    (``Signals.view_index``) on a row of several views or with real tokens of no view (-1), `gprune_view_keys`;
    padding scores 0.

    Args:
        visual: (B, N, D) visual tokens.
        valid: (B, N) bool real tokens, or None (all real).
        similarity, temperature, iterations: as in `gprune_row_scores`.
        views: (B, N) long view of each token, -1 = no view; None = every row one view.
    """
    batch, tokens = visual.shape[:2]
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    scores = torch.zeros(batch, tokens, dtype=torch.float32, device=visual.device)  # (B, N)
    rows = valid_rows(valid, batch, tokens, visual.device)
    for b, positions in enumerate(rows):
        if views is not None:
            real = torch.arange(tokens, device=visual.device) if positions is None else positions  # (n_b,)
            row_views = views[b, real]  # (n_b,)
            free = real[row_views < 0]  # (m,)
            ids = torch.unique(row_views[row_views >= 0]).tolist()
            if free.numel() or len(ids) > 1:
                parts = [real[row_views == v] for v in ids]
                scores[b] = gprune_view_keys(visual[b], parts, similarity, temperature, iterations)  # (N,)
                continue
        if positions is None:
            scores[b] = gprune_row_scores(visual[b], similarity, temperature, iterations)  # (N,)
        else:
            scores[b, positions] = gprune_row_scores(visual[b, positions], similarity, temperature, iterations)  # (n_b,)
    return scores
