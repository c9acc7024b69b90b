"""Selection invariants, generated over every registered stage and preset, through the public kit.

Every property lives in ``vtprune.testing.contracts`` (the check plugin authors call on their own stages): indices
ascending and unique per row, only real tokens, count == the allocator's resolved budget, the critical subset has
the allocator's size and holds the top-scoring tokens, critical flags only on kept slots, a batch gives the same
selection as each row alone, a row cut to its real tokens (or given extra padding) selects the same, a second run
gives the same result (seeded), keep-all budgets keep every real token, the stages called directly return exactly
what they are asked for. Here they run on random ragged batches (hypothesis) and on the kit's deterministic sweep.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtprune.framework import Signals, build_registry, compose, resolve_budget
from vtprune.testing import (
    adaptive_counts,
    check_case,
    check_selection,
    compose_for_contract,
    make_signals,
    ragged_signals,
    registry_cases,
)
from vtprune.testing.properties import contract_inputs

pytestmark = pytest.mark.filterwarnings("ignore:Number of distinct clusters")  # k-means on clustered signals

_REGISTRY = build_registry(autoload=False)
_CASES = registry_cases(_REGISTRY)


def _compose(recipe: str):
    return compose_for_contract(recipe, _REGISTRY)


def _pipelines(*, counts_only: bool = False, exact_only: bool = False) -> list[str]:
    """The standard pipeline of every registered stage and preset (`vtprune.testing.contract_recipes`).

    ``counts_only``: without the pipelines whose allocator takes settings rather than counts (SparseVLM's official
    targets: random budgets are refused); ``exact_only``: only those whose kept count is the resolved budget (no
    adaptive allocator, no ``exact_counts = False`` stage; the adaptive ones get the kit's relaxed contract)."""
    recipes = [recipe for case in _CASES for recipe in case.values[0].recipes(_REGISTRY)]
    out = []
    for recipe in dict.fromkeys(recipes):
        pipeline = _compose(recipe)
        if counts_only and pipeline.budget.budget_settings:
            continue
        if exact_only and adaptive_counts(pipeline):
            continue
        out.append(recipe)
    return out


@pytest.mark.parametrize("case", _CASES)
def test_registered_stage_meets_the_contract(case) -> None:
    """The kit's deterministic sweep: shapes x seeds x (random, clustered) signals x budgets, keep-all included."""
    check_case(case, registry=_REGISTRY)


@pytest.mark.parametrize("recipe", _pipelines(counts_only=True))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=contract_inputs(max_rows=4, max_tokens=24, max_budget=40))
def test_selection_invariants(recipe: str, inputs) -> None:
    lengths, budget, seed = inputs
    pipeline = _compose(recipe)
    # equal rows share `grid`; ragged rows each get their own grid in `grids`, as adapters give images of different sizes
    signals = ragged_signals(lengths, seed=seed)
    selection = check_selection(pipeline, signals, budget, label=recipe)  # the relaxed contract for adaptive counts
    valid = signals.valid()
    expected = pipeline.budget.resolve(budget, valid.sum(1))
    if adaptive_counts(pipeline):
        assert bool((selection.counts <= expected).all())
    else:
        assert torch.equal(selection.counts, expected)
    assert torch.equal(expected, resolve_budget(budget, valid.sum(1))) or pipeline.budget.name != "split"


@pytest.mark.parametrize("recipe", _pipelines())
def test_budget_at_or_above_tokens_keeps_all(recipe: str) -> None:
    pipeline = _compose(recipe)
    signals = make_signals([9, 6], seed=3, grid=None)
    if pipeline.budget.covers(1.0, signals.valid().sum(1), signals.valid().sum(1)) is None:
        pytest.skip(f"{recipe}: budget.{pipeline.budget.name}'s budget is a cap that 1.0 lifts (tests/framework/test_keep_all_rule.py)")
    for budget in (9, 100, 1.0):
        selection = check_selection(pipeline, signals, budget, label=recipe)
        assert torch.equal(selection.kept_mask(9), signals.valid())
    if not pipeline.budget.budget_settings:  # (SparseVLM: 6 is no setting for the 9-token row)
        ragged = check_selection(pipeline, signals, 6, label=recipe)  # the per-row rule: the 6-token row covered alone
        assert ragged.row_indices(1).tolist() == list(range(6))


@pytest.mark.parametrize(
    "recipe",
    [r for r in _pipelines(exact_only=True, counts_only=True) if "diversity.none" not in r and "relevance.none" not in r],
)
@settings(max_examples=10, deadline=None)
@given(lengths=st.lists(st.integers(min_value=2, max_value=20), min_size=1, max_size=3), total=st.integers(1, 20))
def test_critical_subset_size(recipe: str, lengths: list[int], total: int) -> None:
    pipeline = _compose(recipe)
    signals = make_signals(lengths, seed=total)
    selection = pipeline.select(signals, total)
    valid = signals.valid()
    totals = pipeline.budget.resolve(total, valid.sum(1))
    scores = pipeline.relevance.score(signals)
    allocation = pipeline.budget.allocate(totals, valid, None if scores is None else scores.masked_fill(~valid, float("-inf")))
    critical = selection.critical.sum(1)
    if scores is None:
        assert int(critical.sum()) == 0
    else:
        assert torch.equal(critical, torch.minimum(allocation.critical, totals))
        # the critical tokens are the top-scoring ones
        for row in range(len(lengths)):
            chosen = selection.indices[row][selection.critical[row]]
            if chosen.numel():
                threshold = scores[row, chosen].min()
                others = valid[row].clone()
                others[chosen] = False
                assert bool((scores[row][others] <= threshold).all())


def test_padding_never_chosen_even_when_it_scores_highest() -> None:
    signals = make_signals([3, 8], seed=1)
    visual = signals.visual.clone()
    prompt = signals.prompt.clone()
    visual[0, 3:] = prompt[0].mean(0)  # padding identical to the prompt: would score 1.0
    poisoned = Signals(visual=visual, visual_mask=signals.visual_mask, prompt=prompt)
    selection = compose("zspaprune").select(poisoned, 5)
    assert selection.row_indices(0).tolist() == [0, 1, 2]
