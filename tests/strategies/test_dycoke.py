"""DyCoke's TTM against a loop-style re-implementation of the official ``dycole_ttm`` (tests/helpers/video_reference.py):
seeded videos with static backgrounds, moving regions, scene cuts, near ties, newline tokens, ragged batches;
the preset keeps exactly the official set when the budget is the official count; batch == alone."""

from __future__ import annotations

import pytest
import torch
from video_reference import dycoke_ttm_reference

from vtprune.framework import compose
from vtprune.strategies.functional.temporal import (
    dycoke_reference_frames,
    dycoke_ttm,
    dycoke_ttm_count,
)
from vtprune.testing import make_video_signals

VIDEOS = [
    ([(8, 3, 3), (6, 2, 3)], [[4], []], "video"),
    ([(32, 2, 2)], [[9, 20]], "none"),
    ([(7, 3, 2), (4, 2, 2), (1, 2, 2)], [[], [2], []], "frame"),
    ([(10, 4, 4)], [[]], "video"),
]


def _official_positions(signals, row: int, k: float) -> set[int]:
    t_len, h, w = signals.row_frames()[row]
    index = signals.frame_index[row]
    where = (index >= 0).nonzero().flatten()
    kept = dycoke_ttm_reference(signals.visual[row, where], h * w, k)
    positions = {int(where[t * h * w + p]) for t, ps in kept.items() for p in ps}
    valid = signals.valid()[row]
    positions |= {int(j) for j in ((index < 0) & valid).nonzero().flatten()}  # newlines: always kept
    return positions


def test_reference_frames_follow_the_official_loops():
    assert dycoke_reference_frames(8) == [-1, 0, 0, 2, -1, 4, -1, 6]
    ref32 = dycoke_reference_frames(32)
    assert [t for t, r in enumerate(ref32) if r < 0] == [0, 4, 8, 12, 16, 20, 24, 28, 30]
    assert dycoke_ttm_count((32, 14, 14), 0.3) == 9 * 196 + 23 * 137  # int(0.7 * 196) = 137


@pytest.mark.parametrize("frames, cuts, newlines", VIDEOS)
@pytest.mark.parametrize("near_ties", [False, True])
@pytest.mark.parametrize("k", [0.3, 0.5, 0.7])
def test_ttm_equals_the_official_loops(frames, cuts, newlines, near_ties, k):
    signals = make_video_signals(frames, cuts=cuts, newlines=newlines, near_ties=near_ties, seed=len(frames))
    out = dycoke_ttm(signals.visual, signals.frame_index, signals.row_frames(), signals.valid(), k)
    for row in range(signals.batch_size):
        got = set(out.keep[row].nonzero().flatten().tolist())
        assert got == _official_positions(signals, row, k)


@pytest.mark.parametrize("frames, cuts, newlines", VIDEOS)
def test_preset_keeps_the_official_set_at_the_official_count(frames, cuts, newlines):
    signals = make_video_signals(frames, cuts=cuts, newlines=newlines, seed=3)
    pipeline = compose("dycoke")
    budgets = [len(_official_positions(signals, row, 0.3)) for row in range(signals.batch_size)]
    selection = pipeline.select(signals, budgets)
    for row in range(signals.batch_size):
        assert set(selection.row_indices(row).tolist()) == _official_positions(signals, row, 0.3)
        assert int(selection.critical[row].sum()) == budgets[row]


def test_budget_caps_the_official_count_and_covering_budget_keeps_all():
    signals = make_video_signals([(8, 3, 3)], newlines="video", seed=5)
    official = _official_positions(signals, 0, 0.3)
    pipeline = compose("dycoke")
    larger = pipeline.select(signals, len(official) + 4)  # a cap above the official count: the official set
    assert larger.counts.tolist() == [len(official)]
    assert official == set(larger.row_indices(0).tolist())
    assert int(larger.critical.sum()) == len(official)  # the official (adaptive) count is reported
    whole = pipeline.select(signals, 1.0)  # a budget covering every token keeps every token
    assert whole.counts.tolist() == [signals.num_tokens]
    smaller = pipeline.select(signals, 20)
    assert smaller.counts.tolist() == [20] and set(smaller.row_indices(0).tolist()) <= official


def test_rows_without_frames_keep_everything_and_batch_equals_alone():
    signals = make_video_signals([(6, 2, 2), (4, 3, 3)], cuts=[[3], []], newlines="video", seed=2)
    frames = signals.frames.clone()
    frames[1] = 0
    index = signals.frame_index.clone()
    index[1] = -1
    mixed = type(signals)(**{**signals.__dict__, "frames": frames, "frame_index": index})
    out = dycoke_ttm(mixed.visual, mixed.frame_index, mixed.row_frames(), mixed.valid(), 0.3)
    assert torch.equal(out.keep[1], mixed.valid()[1])
    pipeline = compose("dycoke")
    batch = pipeline.select(mixed, 0.6)
    for row in range(2):
        alone = pipeline.select(mixed.row(row), 0.6)
        assert torch.equal(batch.row_indices(row), alone.row_indices(0))


def test_bad_parameters_name_the_problem():
    with pytest.raises(ValueError, match="k"):
        compose("dycoke_ttm(k=1.5)+critical+mustdrop_fill+mustdrop_split+pre_llm")
    with pytest.raises(ValueError, match="prune_ratio"):
        compose("dycoke+decode(policy=dycoke,prune_ratio=1.0)")
