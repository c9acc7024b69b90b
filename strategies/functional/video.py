"""Shared maths of the temporal video methods (FastVID, HoliTom): frame layout of a row, the parameter-free
frame attention proxy, DPC-KNN density-peak scores with seeded tie noise.

Everything works on one video row at a time as a (T, n, D) stack of frames (frame-major, row-major inside a
frame); the stages (strategies/video.py) loop over the rows of a batch, never over tokens.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "TIE_NOISE", "frame_positions", "frame_tokens", "frame_attention", "dpc_knn_scores", "row_generator",
]

#: Scale of the uniform noise DPC-KNN adds to densities to break ties (FastVID and HoliTom: ``rand * 1e-6``).
TIE_NOISE = 1e-6


def frame_positions(frame_index: Tensor, frames: tuple[int, int, int]) -> Tensor:
    """(T, H*W) long: the row positions of each frame's tokens, from a row's ``frame_index`` (N,) (-1 = not a
    frame token) and its (T, H, W); frame-major order means the frame tokens in position order are frame 0's,
    then frame 1's, ..."""
    t_len, h, w = frames
    positions = torch.nonzero(frame_index >= 0, as_tuple=False).squeeze(1)  # (T*H*W,)
    return positions.view(t_len, h * w)


def frame_tokens(row: Tensor, positions: Tensor) -> Tensor:
    """(T, n, D): the tokens of ``row`` (N, D) at ``positions`` (T, n) long, strictly ascending (`frame_positions`).
    When the positions are one run of consecutive tokens (every layout whose frames are not interleaved with other
    tokens: LLaVA-OneVision's video newline comes after the last frame) this is a view of ``row``, not a copy;
    callers must not write to it."""
    count = positions.numel()
    if count:
        ends = positions.reshape(-1)[:: max(count - 1, 1)].tolist()  # [first, last] (one element when count is 1)
        if ends[-1] - ends[0] + 1 == count:  # strictly ascending and spanning count positions: consecutive
            return row[ends[0] : ends[0] + count].view(*positions.shape, row.shape[-1])
    return row[positions]


def frame_attention(tokens: Tensor) -> Tensor:
    """(T, n) float32: how much attention each token of a frame receives, averaged over the frame's queries, of a
    parameter-free self-attention ``softmax(x x^T / sqrt(D))`` on ``tokens`` (T, n, D).

    The proxy for the vision tower's last-layer attention (HoliTom: head and query mean) and for the SigLIP
    attention-pooling head (FastVID) where the adapter gives no vision attention; docs/methods.md."""
    x = tokens.float()  # (T, n, D)
    logits = torch.bmm(x, x.transpose(1, 2)) / math.sqrt(x.shape[-1])  # (T, n, n)
    return logits.softmax(dim=-1).mean(dim=1)  # (T, n)


def row_generator(seed: int, device: torch.device) -> torch.Generator:
    """A fresh generator for one row (the same draws for a row alone or in any batch)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def dpc_knn_scores(x: Tensor, k: int, generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
    """DPC-KNN density-peak scores of each group of tokens ``x`` (G, n, D), as FastVID / HoliTom compute them.

    ``dist = cdist(x, x) / sqrt(D)`` (float32); density ``exp(-mean of the k smallest squared distances)`` (self
    included) plus ``rand * TIE_NOISE`` from ``generator`` (one (G, n) draw; None = no noise); each token's
    distance to the nearest denser token (the group's largest distance for the densest); score = that distance x
    density. Returns (score (G, n), dist (G, n, n)).
    """
    xf = x.float()  # (G, n, D)
    dist = torch.cdist(xf, xf) / (x.shape[-1] ** 0.5)  # (G, n, n)
    nearest = torch.topk(dist, k, dim=-1, largest=False).values  # (G, n, k)
    density = (-(nearest**2).mean(dim=-1)).exp()  # (G, n)
    if generator is not None:
        noise = torch.rand(density.shape, generator=generator, device=density.device, dtype=density.dtype)  # (G, n)
        density = density + noise * TIE_NOISE
    denser = (density[:, None, :] > density[:, :, None]).to(dist.dtype)  # (G, n, n): [i, j] = j denser than i
    dist_max = dist.flatten(1).max(dim=-1).values[:, None, None]  # (G, 1, 1)
    parent_dist = (dist * denser + dist_max * (1 - denser)).min(dim=-1).values  # (G, n)
    return parent_dist * density, dist
