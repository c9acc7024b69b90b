"""Merging output: `Supplement.assignment` -> `Selection.sizes` / ``assignment`` (Pipeline.select and the compiled
select), and the contract check's 'merge output' property."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vtprune.framework import Selection, compose
from vtprune.framework.selection import assemble_selection, merge_output, positions_to_slots
from vtprune.testing import ContractError, check_pipeline, check_selection, check_stage
from vtprune.testing.signals import ragged_signals


def test_positions_become_slots_and_sizes_count_them():
    keep = torch.tensor([[False, True, False, True, True, False]])
    valid = torch.tensor([[True, True, True, True, True, False]])
    assignment = torch.tensor([[3, -1, 1, -1, -1, 1]])  # token 0 -> position 3, token 2 -> position 1
    sizes, merged = merge_output(keep, assignment, valid)
    assert merged.tolist() == [[3, 1, 1, 3, 4, -1]]  # padding (5) never assigned, kept tokens their own position
    selection = assemble_selection(keep, torch.zeros_like(keep), None, 3, sizes, merged)
    assert selection.indices.tolist() == [[1, 3, 4]]
    assert selection.sizes.tolist() == [[2, 2, 1]]
    assert selection.assignment.tolist() == [[1, 0, 0, 1, 2, -1]]
    assert positions_to_slots(torch.tensor([[4, 0, -1, 3, 1, 5]]), selection.indices, selection.mask).tolist() == [[2, -1, -1, 1, 0, -1]]


def test_pipeline_select_reports_merges_with_critical_tokens_standing_for_themselves():
    pipeline = compose("prompt_cosine+critical+diversity.tome_merge+budget.split(critical=0.5)")
    signals = ragged_signals([12, 7], seed=3)
    selection = pipeline.select(signals, 4)
    for row, n in enumerate([12, 7]):
        assert int(selection.sizes[row].sum()) == n  # every real token is covered
        assert bool((selection.sizes[row][selection.critical[row]] == 1).all())
    dense = ragged_signals([9, 9], seed=1)
    dense = dataclasses.replace(dense, visual_mask=None, grids=None, grid=None)
    eager = pipeline.select(dense, 3)
    from vtprune.framework.compiled import plan_select, planned_select

    planned = planned_select(pipeline, dense, plan_select(pipeline, 2, 9, 3))
    assert torch.equal(planned.sizes, eager.sizes) and torch.equal(planned.assignment, eager.assignment)


def test_tome_stage_passes_the_contract():
    check_stage("diversity", "tome_merge")


class _BadSizes:
    """A duck-typed pipeline whose merge sizes do not count its assignment."""

    def __init__(self):
        self.inner = compose("relevance.none+diversity.tome_merge")

    def select(self, signals, budget):
        selection = self.inner.select(signals, budget)
        sizes = selection.sizes.clone()
        sizes[:, 0] += selection.mask[:, 0].long()
        return dataclasses.replace(selection, sizes=sizes)


def test_contract_rejects_sizes_that_do_not_count_the_assignment():
    with pytest.raises(ContractError, match="merge output"):
        check_selection(_BadSizes(), ragged_signals([9, 6], seed=0), 3)
