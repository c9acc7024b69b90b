"""`Signals` validation and the per-row grid rule."""

from __future__ import annotations

import pytest
import torch

from vtprune.framework.signals import SIGNAL_DESCRIPTIONS, Signals, signal_names


def test_every_field_is_described() -> None:
    assert set(signal_names()) == set(SIGNAL_DESCRIPTIONS)


def test_row_grids_prefer_per_row_grids() -> None:
    visual = torch.zeros(3, 12, 4)
    mask = torch.ones(3, 12, dtype=torch.bool)
    assert Signals(visual=visual, grid=(3, 4)).row_grids() == [(3, 4)] * 3
    assert Signals(visual=visual).row_grids() == [None] * 3
    per_row = Signals(visual=visual, visual_mask=mask, grids=torch.tensor([[3, 4], [0, 0], [2, 5]]))
    assert per_row.row_grids() == [(3, 4), None, (2, 5)]
    assert per_row.row(2).row_grids() == [(2, 5)]


@pytest.mark.parametrize(
    "grids,message",
    [
        (torch.tensor([[3, 4]]), r"\(B=2, 2\) integer tensor"),
        (torch.tensor([[3.0, 4.0], [1.0, 1.0]]), "integer"),
        (torch.tensor([[4, 4], [1, 1]]), "larger than the N=12"),
    ],
)
def test_bad_grids_are_rejected(grids, message) -> None:
    with pytest.raises(ValueError, match=message):
        Signals(visual=torch.zeros(2, 12, 4), grids=grids)


def test_video_frames_contract():
    """frames / frame_index: set together, T*H*W frame tokens per video row, frame-major, newlines at -1."""
    import pytest
    from vtprune.framework import Signals
    from vtprune.testing import make_video_signals

    signals = make_video_signals([(3, 2, 2), (2, 2, 3)], newlines="frame", cuts=[[1]])
    assert signals.row_frames() == [(3, 2, 2), (2, 2, 3)]
    index = signals.frame_index
    assert int((index[0] >= 0).sum()) == 12 and int((index[1] >= 0).sum()) == 12
    assert int((index[0] == -1).sum()) == 3  # one newline after each frame, none padding in row 0
    assert signals.row(1).row_frames() == [(2, 2, 3)]
    with pytest.raises(ValueError, match="set together"):
        Signals(visual=signals.visual, frames=signals.frames)
    with pytest.raises(ValueError, match="disagree with frame_index"):
        Signals(visual=signals.visual, frames=signals.frames + 1, frame_index=index)
    with pytest.raises(ValueError, match="frame-major"):
        Signals(visual=signals.visual, frames=signals.frames, frame_index=index.flip(-1))


def test_frame_span_contract():
    """frame_span (issue 15): (B, N, 2) integer, each token's (first, last) frame with 0 <= first <= last, or (-1, -1);
    the video test signals start with every token standing for its own frame."""
    import pytest
    import torch
    from vtprune.framework import Signals
    from vtprune.testing import make_video_signals

    signals = make_video_signals([(3, 2, 2), (2, 2, 3)], newlines="frame")
    assert torch.equal(signals.frame_span[..., 0], signals.frame_index)
    assert torch.equal(signals.frame_span[..., 1], signals.frame_index)
    span = torch.tensor([[[0, 2], [1, 1], [-1, -1]]])
    assert torch.equal(Signals(visual=torch.zeros(1, 3, 4), frame_span=span).row(0).frame_span, span)
    for bad, message in (
        (span.float(), "integer tensor"),
        (span[:, :2], "integer tensor"),
        (torch.tensor([[[2, 1], [1, 1], [-1, -1]]]), "first <= last"),
        (torch.tensor([[[0, 2], [-1, 1], [-1, -1]]]), "first <= last"),
    ):
        with pytest.raises(ValueError, match=message):
            Signals(visual=torch.zeros(1, 3, 4), frame_span=bad)
