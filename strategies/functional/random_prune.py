"""Random baseline: keep ``count`` valid tokens uniformly at random, seeded per row.

Rule (ours): row b uses a fresh ``torch.Generator`` seeded with ``seed`` (or ``seed[b]``) and keeps
``randperm(n_valid, generator=g)[:count]``. A row therefore selects the same tokens alone as in
any batch. (FastV's own K=0 "random" branch uses ``random.shuffle`` of a 0/1 list, unseeded.)
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .common import CountLike, mask_from_positions, per_row_counts, row_positions, valid_or_all

__all__ = ["random_select"]


def random_select(
    valid: Tensor,
    counts: CountLike,
    seed: Union[int, Tensor] = 0,
) -> Tensor:
    """(B, N) bool keep mask of ``counts`` random valid tokens per row.

    Args:
        valid: (B, N) bool validity mask.
        counts: int or (B,) long; clamped to the valid count.
        seed: int (same for every row) or (B,) long per-row seeds.
    """
    batch, tokens = valid.shape
    valid = valid_or_all(valid, batch, tokens, valid.device)
    seeds = per_row_counts(seed, batch)
    kept = []
    for b, (pos, k) in enumerate(zip(row_positions(valid), per_row_counts(counts, batch))):
        k = max(0, min(k, int(pos.numel())))
        gen = torch.Generator(device="cpu").manual_seed(seeds[b])
        perm = torch.randperm(int(pos.numel()), generator=gen)[:k].to(pos.device)
        kept.append(pos[perm])
    return mask_from_positions(kept, batch, tokens, valid.device)
