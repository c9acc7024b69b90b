"""Spatially uniform selection on the patch grid."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["lattice_points", "grid_uniform_select"]


def lattice_points(count: int, height: int, width: int) -> Tensor:
    """(count, 2) float (row, col) points of a near-uniform lattice over a height x width grid.

    Uses r x c cells with r/c close to height/width and r*c >= count, centres of the cells in
    row-major order, the first ``count`` of them.
    """
    rows = max(1, round(math.sqrt(count * height / width)))
    cols = max(1, math.ceil(count / rows))
    while rows * cols < count:
        rows += 1
    r = (torch.arange(rows, dtype=torch.float64) + 0.5) * height / rows - 0.5
    c = (torch.arange(cols, dtype=torch.float64) + 0.5) * width / cols - 0.5
    points = torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(-1, 2)  # (r*c, 2)
    if points.shape[0] > count:
        keep = torch.linspace(0, points.shape[0] - 1, count, dtype=torch.float64).round().long()
        points = points[keep]
    return points


def grid_uniform_select(
    selected: Tensor,
    counts: Tensor,
    valid: Tensor,
    grid: Union[Optional[tuple[int, int]], Sequence[Optional[tuple[int, int]]]],
) -> Tensor:
    """(B, N) bool: ``counts[b]`` more tokens spread uniformly over the patch grid.

    With ``grid`` = (h, w) (row-major tokens; only the first h*w tokens are on the grid), each
    lattice point takes the nearest free candidate (Euclidean grid distance, ties to the lower
    index). Without a grid each row's tokens are treated as a 1-D sequence over that row's own
    extent (h = 1, w = last real position + 1), so a row selects the same alone and in a batch.
    ``grid`` may also be a list with one (h, w) or None per row (``Signals.row_grids()``).
    """
    batch, tokens = valid.shape
    per_row = list(grid) if isinstance(grid, list) else [grid] * batch
    picked = torch.zeros_like(valid)
    for row in range(batch):
        want = int(counts[row])
        if per_row[row] is not None:
            height, width = per_row[row]
        else:  # this row's own extent as a 1-D sequence, so padding never shifts the lattice
            real = torch.nonzero(valid[row]).flatten()
            height, width = 1, int(real[-1]) + 1 if real.numel() else 1
        on_grid = min(tokens, height * width)
        coords = torch.stack([torch.arange(on_grid) // width, torch.arange(on_grid) % width], dim=-1).double()  # (G, 2)
        free = (valid[row] & ~selected[row]).cpu().clone()
        free[on_grid:] = False
        want_on_grid = min(want, int(free.sum()))
        for point in lattice_points(want_on_grid, height, width) if want_on_grid else []:
            distance = ((coords - point) ** 2).sum(-1).masked_fill(~free[:on_grid], float("inf"))  # (G,)
            choice = int(distance.argmin())
            free[choice] = False
            picked[row, choice] = True
        leftover = want - want_on_grid
        if leftover > 0:  # tokens off the grid (e.g. newline tokens): first free ones in order
            rest = torch.nonzero(valid[row] & ~selected[row] & ~picked[row]).flatten()[:leftover]
            picked[row, rest] = True
    return picked
