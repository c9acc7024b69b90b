"""Masked top-k with a documented tie rule."""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

__all__ = ["top_k_mask"]


def top_k_mask(scores: Tensor, counts: Union[int, Tensor], valid: Tensor) -> Tensor:
    """(B, N) bool: the ``counts[b]`` highest-scoring real tokens of row b.

    Ties go to the lower index (a stable descending sort), so the result is deterministic.
    NaN scores rank last. ``counts`` ((B,) long, or one int for every row) is clamped to the number
    of real tokens.

    >>> top_k_mask(torch.tensor([[1.0, 3.0, 3.0, 2.0]]), torch.tensor([2]), torch.ones(1, 4, dtype=torch.bool)).tolist()
    [[False, True, True, False]]
    """
    ranked = scores.float().nan_to_num(nan=float("-inf")).masked_fill(~valid, float("-inf"))  # (B, N)
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices  # (B, N)
    real = valid.sum(dim=1)  # (B,)
    counts = real.clamp(max=counts) if isinstance(counts, int) else torch.minimum(counts.long(), real)  # (B,)
    take = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0) < counts.unsqueeze(1)  # (B, N)
    keep = torch.zeros_like(valid)
    keep.scatter_(1, order, take)
    return keep & valid
