"""Seeded randomness that is per row: a row gets the same draw alone or inside any batch."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["row_uniform"]


def row_uniform(batch: int, tokens: int, seed: int, device: torch.device | str = "cpu") -> Tensor:
    """(B, N) float32 uniform draws; every row uses its own generator seeded with ``seed``.

    Each row therefore sees the same stream whatever its position in the batch (so batched and
    single-sample runs agree); two rows with the same number of tokens get the same draws.
    """
    rows = []
    for _ in range(batch):
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        rows.append(torch.rand(tokens, generator=generator))
    if not rows:
        return torch.zeros(0, tokens, device=device)
    return torch.stack(rows).to(device)  # (B, N)
