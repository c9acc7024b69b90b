"""`Pipeline.select`'s keep-all rule (issue 14): a row whose budget covers its real tokens keeps them all, with their own
values and nothing merged into them, for every pipeline and per row (a ragged batch mixes covered and pruned rows);
an allocator says when its budget is a setting rather than a count (`BudgetAllocator.covers`, `budget_settings`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from vtprune.framework import Signals, build_registry, compose
from vtprune.framework.stages import Allocation, BudgetAllocator, DiversitySupplementer, Supplement
from vtprune.testing import compose_for_contract, make_video_signals, ragged_signals

pytestmark = pytest.mark.filterwarnings("ignore:Number of distinct clusters")  # k-means on tiny rows

REGISTRY = build_registry(autoload=False)
LENGTHS = [12, 5, 9]  # row 0 pruned, rows 1 and 2 covered by the per-row budget below


def _budget(pipeline) -> list:
    """Row 0: a pruning budget (the allocator's first setting where its budget is one); rows 1 and 2: covering."""
    settings = pipeline.budget.budget_settings
    return [settings[0] if settings else 0.5, 1.0, 100]


def _assert_whole(selection, signals: Signals, row: int, length: int) -> None:
    assert selection.row_indices(row).tolist() == list(range(length))
    assert torch.equal(selection.gather(signals.visual)[row, :length], signals.visual[row, :length])  # own values
    if selection.sizes is not None:  # merging output: nothing merged into a kept token
        assert selection.sizes[row, :length].tolist() == [1] * length
        assert selection.assignment[row, :length].tolist() == list(range(length))


@pytest.mark.parametrize("preset", sorted(REGISTRY.presets))
def test_covered_rows_of_a_ragged_batch_keep_every_token_untouched(preset: str) -> None:
    pipeline = compose_for_contract(preset, REGISTRY)
    signals = ragged_signals(LENGTHS, seed=2)
    budget = _budget(pipeline)
    covered = pipeline.budget.covers(budget, pipeline.budget.resolve(1.0, torch.tensor(LENGTHS)), torch.tensor(LENGTHS))
    selection = pipeline.select(signals, budget)
    if covered is None:  # the budget is a cap (PruneVid): no row kept whole; still at most the row's tokens
        assert bool((selection.counts <= torch.tensor(LENGTHS)).all())
        return
    for row in (1, 2):
        _assert_whole(selection, signals, row, LENGTHS[row])
        alone = pipeline.select(signals.row(row), [budget[row]])  # the same as the row alone
        assert selection.row_indices(row).tolist() == alone.row_indices(0).tolist()
        assert torch.equal(selection.critical[row][selection.mask[row]], alone.critical[0][alone.mask[0]])


@dataclass(frozen=True, eq=False)
class _KeepsFirstHalf(DiversitySupplementer):
    """A merging stage that ignores how many tokens it is asked for: the first half of the free tokens, each averaged
    with its right neighbour (never what a covered row needs)."""

    name: ClassVar[str] = "keeps_first_half"
    description: ClassVar[str] = "test stage: keeps its own count, merges"
    exact_counts: ClassVar[bool] = False

    def supplement(self, signals, selected, counts, valid, scores):
        free = valid & ~selected  # (B, N)
        rank = free.long().cumsum(1)  # (B, N)
        keep = free & (rank <= (free.sum(1, keepdim=True) + 1) // 2)  # (B, N)
        values = (signals.visual + signals.visual.roll(-1, dims=1)) / 2  # (B, N, D)
        assignment = torch.where(free, torch.arange(free.shape[1]).expand_as(free), -1)  # (B, N)
        return Supplement(keep, values, assignment)


@dataclass(frozen=True, eq=False)
class _Cap(BudgetAllocator):
    """An allocator whose budget is a cap that never keeps a row whole (`covers` None)."""

    name: ClassVar[str] = "cap"
    description: ClassVar[str] = "test allocator: opts out of the keep-all rule"

    def allocate(self, totals, valid, scores):
        return Allocation(total=totals, critical=torch.zeros_like(totals))

    def covers(self, budget, totals, valid_counts):
        return None


def test_the_rule_overrides_a_stage_that_keeps_its_own_count_unless_the_allocator_opts_out() -> None:
    signals = ragged_signals(LENGTHS, seed=0)
    base = compose("relevance.none+fps")
    pipeline = dataclasses.replace(base, diversity=_KeepsFirstHalf())
    selection = pipeline.select(signals, 9)  # rows 1 (5 tokens) and 2 (9) covered, row 0 the stage's own half
    assert selection.counts.tolist() == [6, 5, 9]
    _assert_whole(selection, signals, 1, 5)
    _assert_whole(selection, signals, 2, 9)
    assert not torch.equal(selection.gather(signals.visual)[0, :6], signals.visual[0, :6])  # row 0 merged
    opted_out = dataclasses.replace(pipeline, budget=_Cap()).select(signals, 9)
    assert opted_out.counts.tolist() == [6, 3, 5]  # the stage's own count everywhere
    everything = pipeline.select(signals, 1.0)  # every row covered: one shortcut, the stage is not called
    assert everything.counts.tolist() == LENGTHS and everything.values is None


def test_sparsevlm_budget_is_a_setting_except_a_covering_non_official_one() -> None:
    rank = compose("sparsevlm", registry=REGISTRY).budget
    counts = torch.tensor([20, 70])
    assert rank.budget_settings == (64, 128, 192)
    assert rank.covers(64, counts, counts).tolist() == [False, False]  # official: always the rank rule
    assert rank.covers(50, counts, counts).tolist() == [True, False]  # covers the 20-token row only
    assert rank.covers([1.0, 0.5], counts, counts).tolist() == [True, False]
    custom = compose("sparsevlm", scale=1.0, bias=0.0, registry=REGISTRY).budget
    assert custom.covers(1.0, counts, counts) is None and custom.budget_settings == ()


def test_prunevid_budget_is_a_cap_that_one_lifts() -> None:
    """PruneVid's documented behaviour (docs/methods.md): budget 1.0 runs the released method uncapped (the video
    configs rely on it), so its allocator opts out of the keep-all rule; keep-all takes the neutral parameters."""
    pipeline = compose("prunevid", registry=REGISTRY)
    signals = make_video_signals([(4, 3, 3), (2, 3, 3)], seed=1)
    tokens = signals.valid().sum(1)  # (B,)
    assert pipeline.budget.covers(1.0, tokens, tokens) is None
    uncapped = pipeline.select(signals, 1.0)
    assert bool((uncapped.counts < tokens).all())  # the method's own count, not every token
    assert torch.equal(pipeline.select(signals, 10_000).counts, uncapped.counts)  # any covering cap: the same
    neutral = compose("prunevid", tau=1.0, cluster_ratio=1.0, registry=REGISTRY).select(signals, 1.0)
    assert torch.equal(neutral.counts, tokens)
