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
