"""Automatic critical/diversity splits: the ``gap`` allocator (preset ``zspaprune_auto``) and ``auto``.

``relevance_gap_counts`` (the ``gap`` allocator, used by ``zspaprune_auto``): the tokens the prompt singles
out are the top of the relevance ranking down to its first large drop. Sort a row's scores (descending);
the *relevant set* is the top ``k`` tokens when the score falls by at least ``drop`` between the ``k``-th
and the ``(k+1)``-th token, the first such ``k <= window``; if no such drop exists in the top
``window + 1`` tokens (relevance is spread over the scene, or over an object larger than ``window``
tokens) the set is empty. Then

    critical = min(k, K - reserve)                 if k <= 1 (one standout token, or none: 0)
    critical = min(ceil(extend * k), K - reserve)  if k >= 2 (a set of several tokens)

so a prompt that names one small object keeps that token, one that names several near-identical objects
keeps all of them (farthest point would keep only one: they are near-duplicates) plus the next
``(extend - 1) k`` tokens by relevance (the same kind of evidence: on the organism's crowd task the answer
keeps improving with them), and ``reserve`` slots always go to coverage. Scores are cosine similarities,
so ``drop`` is in cosine units.

``relevance_coverage_counts`` (the ``auto`` allocator, the first rule of issue 18, kept for comparison).
One objective trades relevance against coverage, per row, from the relevance scores alone.
Let ``p = softmax(scores / temperature)`` over the row's real tokens (the relevance mass of each
token) and ``K`` the row's budget. Giving the ``k``-th most relevant token a critical slot gains
its relevance mass ``p_(k)``; it costs one of the ``K`` diversity slots, worth a fixed share
``trade / K`` of the coverage. Maximising ``sum_{k <= c} p_(k) + trade * (K - c) / K`` over
``c in [0, K]`` (the gains are sorted, so the objective is concave in ``c``) gives

    critical = #{k < K : p_(k) > trade / K}

* A peaked relevance (one small object named by the prompt, e.g. the clutter task) puts most of
  the mass on a few tokens: they pass the threshold and are kept for sure.
* A flat relevance (a question about the whole scene, or about nothing visible) puts about
  ``1 / N`` on every token: nothing passes and the whole budget buys coverage.
* A larger budget lowers the threshold ``trade / K``: more critical tokens when there are
  slots to spare.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_gap_parameters", "relevance_coverage_counts", "relevance_gap_counts", "relevance_mass"]


def relevance_mass(scores: Tensor, valid: Tensor, temperature: float) -> Tensor:
    """(B, N) float32: ``softmax(scores / temperature)`` over each row's real tokens (0 at padding).

    A row with no real token is all zeros.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = (scores.float() / temperature).masked_fill(~valid, float("-inf"))  # (B, N)
    return torch.softmax(logits, dim=1).nan_to_num(0.0)  # (B, N)


def relevance_coverage_counts(
    scores: Tensor, valid: Tensor, totals: Tensor, temperature: float, trade: float
) -> Tensor:
    """(B,) long critical counts maximising relevance mass + ``trade`` x coverage share (module doc).

    Args:
        scores: (B, N) relevance scores; valid: (B, N) bool; totals: (B,) long budgets per row.
        temperature: > 0, the softmax temperature of the relevance mass.
        trade: >= 0, the coverage worth of the whole budget in units of relevance mass.
    Returns: ``0 <= critical <= totals`` per row; a row with a zero total gets 0.
    """
    if trade < 0:
        raise ValueError(f"trade must be >= 0, got {trade}")
    mass = relevance_mass(scores, valid, temperature)  # (B, N)
    threshold = trade / totals.clamp(min=1).to(mass.dtype)  # (B,)
    passing = ((mass > threshold.unsqueeze(1)) & valid).sum(dim=1)  # (B,)
    return torch.minimum(passing, totals.clamp(min=0))  # (B,)


def check_gap_parameters(drop: float, reserve: int, window: int, extend: float) -> None:
    """Raise a ValueError naming the first of the gap rule's parameters out of range."""
    if drop <= 0:
        raise ValueError(f"drop must be > 0, got {drop}")
    if reserve < 0:
        raise ValueError(f"reserve must be >= 0, got {reserve}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if extend < 1:
        raise ValueError(f"extend must be >= 1, got {extend}")


def relevance_gap_counts(
    scores: Tensor, valid: Tensor, totals: Tensor, drop: float, reserve: int, window: int, extend: float = 1.0
) -> Tensor:
    """(B,) long critical counts: the relevant set before the first relevance drop, capped (module doc).

    Args:
        scores: (B, N) relevance scores; valid: (B, N) bool; totals: (B,) long budgets per row.
        drop: > 0, the smallest fall between consecutive sorted scores that ends the relevant set.
        reserve: >= 0, budget slots always left to diversity.
        window: >= 1, the largest relevant set looked for.
        extend: >= 1, a set of ``k >= 2`` tokens asks for ``ceil(extend * k)`` critical slots.
    Returns: ``0 <= critical <= max(totals - reserve, 0)`` per row. Padding never counts: a fall onto or
    after a padding token is not a drop, so a row whose real tokens all lie within ``window`` and show no
    drop gets 0.
    """
    check_gap_parameters(drop, reserve, window, extend)
    width = min(window + 1, scores.shape[1])
    if width < 2:  # one token: no fall to look for
        return torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    ranked = scores.float().masked_fill(~valid, float("-inf"))  # (B, N)
    top = torch.topk(ranked, width, dim=1).values  # (B, W) descending
    real = torch.isfinite(top)  # (B, W)
    falls = (top[:, :-1] - top[:, 1:]) >= drop  # (B, W - 1): a drop after rank k (k = 1 .. W - 1)
    falls &= real[:, 1:]  # a fall onto padding is not a drop
    found = falls.any(dim=1)  # (B,)
    size = torch.where(found, falls.float().argmax(dim=1) + 1, torch.zeros_like(found, dtype=torch.long))  # (B,)
    extended = torch.ceil(size.double() * extend).long()  # (B,) exact for the usual halves and quarters
    size = torch.where(size >= 2, extended, size)  # (B,)
    cap = (totals - reserve).clamp(min=0)  # (B,)
    return torch.minimum(size, cap)  # (B,)
