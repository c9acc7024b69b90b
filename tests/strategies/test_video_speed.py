"""The speed work on the video presets (issue 15, "Speed") keeps their arithmetic: the shared cosine helper equals
``F.cosine_similarity`` bit for bit, frame tokens are a view only where that is the same tensor, HoliTom's batched DP
equals the per-cell loop, and PruneVid's batched per-segment noise is the official sequence of per-frame draws."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vtprune.strategies.functional.holitom import holitom_windows, static_window_counts
from vtprune.strategies.functional.common import unit_rows
from vtprune.strategies.functional.video import frame_positions, frame_tokens


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(6, 5, 24), (9, 16, 12), (3, 7, 3584)])
def test_unit_rows_products_equal_cosine_similarity_bitwise(seed, shape):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator) * 10.0 ** (seed - 2)  # (T, n, D)
    x[:, 0] = 0.0  # zero vectors: the norm floor
    units = unit_rows(x)
    assert torch.equal((units[:-1] * units[1:]).sum(-1), F.cosine_similarity(x[:-1], x[1:], dim=-1))
    # strided frame views (DyCoke's pairs) and the in-place form on a buffer the caller owns
    normed = F.normalize(x, p=2, dim=-1)
    expected = F.cosine_similarity(F.normalize(x[0::2][: shape[0] // 2], dim=-1), F.normalize(x[1::2][: shape[0] // 2], dim=-1), dim=-1)
    inplace = unit_rows(normed.clone(), inplace=True)
    half = shape[0] // 2
    assert torch.equal((inplace[0 : 2 * half : 2] * inplace[1 : 2 * half : 2]).sum(-1), expected)


def test_frame_tokens_is_a_view_only_for_consecutive_frames():
    row = torch.randn(2 * 3 * 4 + 1, 5)  # (N, D): 2 frames of 3x4, then one newline
    index = torch.cat([torch.arange(2).repeat_interleave(12), torch.tensor([-1])])  # (N,)
    positions = frame_positions(index, (2, 3, 4))  # (T, n)
    view = frame_tokens(row, positions)
    assert view.data_ptr() == row.data_ptr() and torch.equal(view, row[positions])
    # a newline after every frame: frames are not one run, so a gathered copy
    interleaved = torch.tensor([0] * 12 + [-1] + [1] * 12 + [-1])  # (N + 1,)
    row2 = torch.randn(interleaved.numel(), 5)
    positions2 = frame_positions(interleaved, (2, 3, 4))
    copy = frame_tokens(row2, positions2)
    assert copy.data_ptr() != row2.data_ptr() and torch.equal(copy, row2[positions2])
    assert frame_tokens(row2, positions2[:1, :1]).shape == (1, 1, 5)


def _windows_per_cell(feature_sim, tau, max_window):
    """The DP as the official ``select_static_windows`` loops it: one float32 sum and strict comparison per cell."""
    counts = static_window_counts(feature_sim, tau)
    t_len = feature_sim.shape[0] + 1
    dp = torch.zeros(t_len)
    prev = [0] * t_len
    for i in range(t_len):
        best, best_j = (dp[i - 1].clone() if i > 0 else torch.tensor(0.0)), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            value = (dp[j] if j >= 0 else torch.tensor(0.0)) + counts[j + 1, i]
            if value > best:
                best, best_j = value, j + 1
        dp[i], prev[i] = best, best_j
    windows, i = [], t_len - 1
    while i >= 0:
        windows.append((prev[i], i))
        i = prev[i] - 1
    return windows[::-1], float(dp[-1])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_window", [1, 2, 3, 5, 1024])
def test_holitom_windows_equal_the_per_cell_loop(seed, max_window):
    generator = torch.Generator().manual_seed(seed)
    frames, tokens = 4 + 3 * seed, 9
    # coarse similarities: many windows remove the same count (ties between candidates)
    feature_sim = torch.randint(0, 3, (frames - 1, tokens), generator=generator).float() * 0.45  # (T - 1, n)
    assert holitom_windows(feature_sim, 0.8, max_window) == _windows_per_cell(feature_sim, 0.8, max_window)


def test_batched_noise_is_the_sequence_of_per_group_draws():
    """PruneVid merges a segment's frames in one DPC-KNN call: its (W, m) draw must be the official W (1, m) draws."""
    for width, size in [(1, 15), (4, 20), (7, 196)]:
        batched = torch.rand(width, size, generator=torch.Generator().manual_seed(5))
        generator = torch.Generator().manual_seed(5)
        assert torch.equal(batched, torch.cat([torch.rand(1, size, generator=generator) for _ in range(width)]))
