"""The automatic critical/diversity split (``auto`` allocator, preset ``zspaprune_auto``).

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

__all__ = ["relevance_coverage_counts", "relevance_mass"]


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
