"""FitPrune's maths (`strategies.functional.fitprune`) against the official op sequences on seeded inputs, the
placement's counts against the official recipe table, and the bisection against the official loop and a brute-force
sweep of its grid. The model-level checks are tests/adapters/test_fitprune_end_to_end.py."""

from __future__ import annotations

import pytest
import torch

from vtprune import framework
from vtprune.strategies.fitprune import OFFICIAL_DELETIONS_60, FitPruneRecipe
from vtprune.strategies.functional.fitprune import (
    FlopModel,
    fitprune_deletion_count,
    fitprune_keep_ratios,
    fitprune_scheme,
    fitprune_scores,
    fitprune_search,
    fitprune_sort_drop,
)
from vtprune.testing import make_signals, pad_signals, trim_row

REGISTRY = framework.build_registry(autoload=False)


def _official_scores(prompt_rows, visual_rows):
    """The official inference lines on one image: head max, self / n summed over queries, cross summed."""
    n = visual_rows.shape[-1]
    self_attention = (visual_rows.max(dim=0).values / n).sum(dim=0)
    cross_attention = prompt_rows.max(dim=0).values.sum(dim=0)
    return cross_attention * self_attention


@pytest.mark.parametrize("seed", range(4))
def test_scores_are_the_official_lines_per_row_and_ignore_padding(seed):
    lengths = [12, 7, 9]
    signals = make_signals(lengths, seed=seed, heads=3)
    scores = fitprune_scores(signals.prompt_attention, signals.visual_attention, signals.visual_mask, signals.prompt_mask)
    for row, n in enumerate(lengths):
        want = _official_scores(signals.prompt_attention[row, :, :, :n], signals.visual_attention[row, :, :n, :n])
        assert torch.equal(scores[row, :n], want)
        assert bool((scores[row, n:] == 0).all())
        alone = trim_row(signals, row, n)
        assert torch.equal(fitprune_scores(alone.prompt_attention, alone.visual_attention)[0], want)
    padded = pad_signals(signals, 5, seed=seed)  # huge values in padded rows and columns change nothing
    again = fitprune_scores(padded.prompt_attention, padded.visual_attention, padded.visual_mask, padded.prompt_mask)
    assert torch.equal(again[:, : scores.shape[1]], scores)


def test_sort_drop_deletes_the_first_entries_of_an_ascending_sort():
    generator = torch.Generator().manual_seed(3)
    scores = torch.rand(3, 10, generator=generator)
    scores[1, 2] = scores[1, 5]  # a tie
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[2, 7:] = False
    keep = fitprune_sort_drop(scores, torch.tensor([6, 4, 5]), valid)
    for row, (k, n) in enumerate(zip([6, 4, 5], [10, 10, 7])):
        deleted = torch.sort(scores[row, :n], dim=-1).indices[: n - k]
        want = torch.ones(10, dtype=torch.bool)
        want[deleted] = False
        want[n:] = False
        assert torch.equal(keep[row], want)


def _official_count(weights, total, alpha):
    """``fit_model``'s loop, explicit sums per i (no qualifying i: the continuation n - 1)."""
    order = torch.argsort(weights)
    whole = weights.sum()
    for i in range(len(order)):
        if (whole - weights[order[:i]].sum()) < (total - total * alpha):
            return max(i - 1, 0)
    return len(order) - 1


@pytest.mark.parametrize("seed", range(6))
def test_deletion_count_is_the_official_loop(seed):
    generator = torch.Generator().manual_seed(seed)
    weights = torch.rand(40, generator=generator) ** 3
    for total in (float(weights.sum()), float(weights.sum()) * 1.1, float(weights.sum()) * 0.7):
        for alpha in (0.0, 0.05, 0.3, 0.5, 0.9, 0.99):
            assert fitprune_deletion_count(weights, total, alpha) == _official_count(weights, total, alpha)


def test_placement_reproduces_the_official_recipe_counts():
    placement = FitPruneRecipe()
    assert placement.deletions == OFFICIAL_DELETIONS_60 and sum(OFFICIAL_DELETIONS_60) == 449
    pipeline = framework.compose("fitprune", registry=REGISTRY)
    drops = placement.drops(576 - OFFICIAL_DELETIONS_60[0])
    present, deleted = 576, {}
    for drop in drops:
        kept = int(pipeline.budget.resolve(drop.budget, torch.tensor([present]))[0])
        deleted[drop.layer - 1] = present - kept
        present = kept
    want = {layer: d for layer, d in enumerate(OFFICIAL_DELETIONS_60[:-1]) if d or layer == 0}
    assert deleted == want
    first, ratios = fitprune_keep_ratios(OFFICIAL_DELETIONS_60, 576)
    assert first == 562 and [r for r in ratios[:-1] if r < 1] == [r for _, r in placement.ratios()]


def test_placement_and_ratio_errors_name_the_problem():
    with pytest.raises(ValueError, match="deletions must be >= 0"):
        FitPruneRecipe(deletions=(1, -2))
    with pytest.raises(ValueError, match="at least one token must stay"):
        FitPruneRecipe(deletions=(10, 6, 0), tokens=16)
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        FitPruneRecipe(tokens=0)
    with pytest.raises(ValueError, match="pick must be"):
        fitprune_search(lambda a: (True, []), pick="best")


def test_scheme_stops_at_the_first_layer_whose_forecast_meets_the_budget():
    flops = FlopModel(hidden=8, intermediate=16, layers=4)
    runs = [[3, 2, 2, 1], [1, 4, 2, 0]]
    met, scheme = fitprune_scheme(runs, [10, 10], flops, reduction=0.0)
    assert met and scheme == [0, 0, 0, 0]  # nothing to remove: met before layer 0
    met, scheme = fitprune_scheme(runs, [10, 10], flops, reduction=0.99)
    assert not met and scheme == [2, 3, 2, 0]  # floor of the per-layer means, every layer
    met, scheme = fitprune_scheme(runs, [10, 10], flops, reduction=0.3)
    assert met and scheme[-1] == 0 and scheme[0] == 2


def _official_bisection(evaluate):
    max_alpha, min_alpha, probes, scheme = 1.0, 0.0, [], None
    while max_alpha - min_alpha > (0.01 + 1e-6):
        mid_alpha = (min_alpha + max_alpha) / 2
        reached, scheme = evaluate(mid_alpha)
        probes.append((mid_alpha, reached))
        if reached:
            max_alpha = mid_alpha
        else:
            min_alpha = mid_alpha
    return scheme, probes


@pytest.mark.parametrize("threshold", [0.0, 0.013, 0.3, 0.5, 0.71, 0.999, 1.5])
def test_bisection_is_the_official_loop_and_finds_the_brute_force_alpha(threshold):
    def evaluate(alpha):  # monotone: a larger alpha deletes more
        return alpha >= threshold, [int(alpha * 1000)]

    result = fitprune_search(evaluate, pick="last")
    scheme, probes = _official_bisection(evaluate)
    assert list(result.scheme) == scheme and list(result.probes) == probes
    feasible = fitprune_search(evaluate)
    grid = [k / 128 for k in range(1, 129)]
    brute = next((a for a in grid if evaluate(a)[0]), 1.0)  # the smallest grid alpha that meets the budget
    assert feasible.alpha == brute and list(feasible.scheme) == evaluate(brute)[1]
    assert feasible.reached == (threshold <= 1.0)
