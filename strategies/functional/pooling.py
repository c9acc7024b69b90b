"""Average-pooling baseline: pool the (h, w) patch grid down to about ``count`` tokens.

Rules (ours, documented in docs/peers-notes.md):
* pooled grid: ``oh = clamp(round(h * sqrt(count / (h * w))), 1, h)``,
  ``ow = clamp(count // oh, 1, w)`` (aspect preserving; 24x24 -> 8x8 for 64, 12x12 for 144,
  14x13 = 182 for 192). ``oh * ow <= count`` whenever ``count >= 1`` and the grid is not clamped.
* windows: ``torch.nn.functional.adaptive_avg_pool2d`` semantics: rows
  ``[floor(i*h/oh), ceil((i+1)*h/oh))``, likewise columns (windows may overlap when the size does
  not divide).
* representative position: the TOP-LEFT token of each window (distinct because window starts are
  strictly increasing); its replacement value is the window mean. Ascending representative
  positions are the pooled grid in row-major order.
* ragged rows: the row's valid tokens, in order, must form the (h, w) grid.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import CountLike, per_row_counts, row_positions, valid_or_all

__all__ = ["pooled_grid_shape", "pooling_select", "pooling_exact_select", "pooling_bands"]


def pooled_grid_shape(h: int, w: int, count: int) -> tuple[int, int]:
    """Pooled grid (oh, ow) for about ``count`` tokens out of an (h, w) grid."""
    count = max(1, min(int(count), h * w))
    oh = min(h, max(1, round(h * math.sqrt(count / (h * w)))))
    ow = min(w, max(1, count // oh))
    return oh, ow


def pooling_select(
    visual: Tensor,
    grid: tuple[int, int],
    counts: CountLike,
    valid: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Average-pool each row's (h, w) token grid.

    Args:
        visual: (B, N, D) visual tokens, row-major grid order.
        grid: (h, w) patch grid of every row (h * w valid tokens per row).
        counts: int or (B,) long target token count.
        valid: (B, N) bool or None.

    Returns:
        keep: (B, N) bool at each window's top-left token;
        values: (B, N, D) ``visual`` with each kept position replaced by its window mean.
    """
    batch, tokens, dim = visual.shape
    h, w = int(grid[0]), int(grid[1])
    valid = valid_or_all(valid, batch, tokens, visual.device)
    keep = torch.zeros(batch, tokens, dtype=torch.bool, device=visual.device)
    values = visual.clone()
    for b, (pos, k) in enumerate(zip(row_positions(valid), per_row_counts(counts, batch))):
        if int(pos.numel()) != h * w:
            raise ValueError(f"row {b} has {int(pos.numel())} valid tokens, grid {h}x{w} needs {h * w}")
        oh, ow = pooled_grid_shape(h, w, k)
        image = visual[b, pos].t().reshape(1, dim, h, w)  # (1, D, h, w)
        pooled = F.adaptive_avg_pool2d(image, (oh, ow))[0].reshape(dim, oh * ow).t()  # (oh*ow, D)
        rows = torch.tensor([(i * h) // oh for i in range(oh)], device=visual.device)
        cols = torch.tensor([(j * w) // ow for j in range(ow)], device=visual.device)
        local = (rows[:, None] * w + cols[None, :]).flatten()  # (oh*ow,)
        values[b, pos[local]] = pooled.to(visual.dtype)
        keep[b, pos[local]] = True
    return keep, values


def pooling_bands(h: int, w: int, count: int) -> list[int]:
    """Windows per band of rows for EXACTLY ``count`` pooled tokens of an (h, w) grid.

    ``oh`` bands of rows (``pooled_grid_shape``'s ``oh``, raised to ``ceil(count / w)`` and
    lowered to ``count`` where needed); ``count`` is split over the bands as evenly as possible,
    the first ``count % oh`` bands getting one more window. When ``count == oh * ow`` of
    ``pooled_grid_shape`` every band has ``ow`` windows (the plain pooled grid).
    """
    count = max(1, min(int(count), h * w))
    oh = pooled_grid_shape(h, w, count)[0]
    oh = min(h, count, max(oh, -(-count // w)))
    q, r = divmod(count, oh)
    return [q + 1 if i < r else q for i in range(oh)]


def pooling_exact_select(
    visual: Tensor,
    grid: Union[Optional[tuple[int, int]], Sequence[Optional[tuple[int, int]]]],
    counts: CountLike,
    valid: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Average pooling to exactly ``counts[b]`` tokens per row (the `pooling` stage's rule).

    Like :func:`pooling_select` (same windows, top-left representatives, window means) when the
    pooled grid holds exactly ``count`` tokens; otherwise bands of rows with
    :func:`pooling_bands` windows each (adaptive windows inside each band). A row whose valid
    token count is not ``h * w`` (or ``grid`` None) is pooled as a 1-D sequence (h = 1). ``grid``
    may also be a list with one (h, w) or None per row (``Signals.row_grids()``).
    """
    batch, tokens, dim = visual.shape
    per_row = list(grid) if isinstance(grid, list) else [grid] * batch
    valid = valid_or_all(valid, batch, tokens, visual.device)
    keep = torch.zeros(batch, tokens, dtype=torch.bool, device=visual.device)
    values = visual.clone()
    for b, (pos, k) in enumerate(zip(row_positions(valid), per_row_counts(counts, batch))):
        n = int(pos.numel())
        k = max(0, min(k, n))
        if k == 0:
            continue
        g = per_row[b]
        h, w = (int(g[0]), int(g[1])) if g is not None and int(g[0]) * int(g[1]) == n else (1, n)
        bands = pooling_bands(h, w, k)
        oh = len(bands)
        image = visual[b, pos].t().reshape(1, dim, h, w)  # (1, D, h, w)
        if len(set(bands)) == 1:  # the plain pooled grid: pooling_select's exact ops
            ow = bands[0]
            pooled = F.adaptive_avg_pool2d(image, (oh, ow))[0].reshape(dim, oh * ow).t()  # (oh*ow, D)
            rows = torch.tensor([(i * h) // oh for i in range(oh)], device=visual.device)
            cols = torch.tensor([(j * w) // ow for j in range(ow)], device=visual.device)
            local = (rows[:, None] * w + cols[None, :]).flatten()  # (oh*ow,)
        else:
            parts, where = [], []
            for i, ow in enumerate(bands):
                top, bottom = (i * h) // oh, -(-((i + 1) * h) // oh)
                band = F.adaptive_avg_pool2d(image[:, :, top:bottom, :], (1, ow))[0].reshape(dim, ow).t()  # (ow, D)
                parts.append(band)
                where.extend(top * w + (j * w) // ow for j in range(ow))
            pooled = torch.cat(parts)  # (k, D)
            local = torch.tensor(where, device=visual.device)
        values[b, pos[local]] = pooled.to(visual.dtype)
        keep[b, pos[local]] = True
    return keep, values
