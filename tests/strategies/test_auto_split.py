"""The ``auto`` allocator (the first rule of issue 18; ``zspaprune_auto`` now uses ``gap``): relevance mass vs coverage.

The functional rule is compared with a plain loop re-implementation of the objective it maximises
(``sum of the top-c masses + trade * (K - c) / K`` over every c, the smallest best c), then the
allocator's properties: counts within [0, total], a batch equals each row alone, padding is never
counted and extra padding changes nothing, flat relevance spends everything on diversity, a peak is
kept; and a pipeline using it meets the kit's contract (`vtprune.testing.check_pipeline`).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtprune.framework import build_registry, compose
from vtprune.strategies.budget import AutoSplit, GapSplit
from vtprune.strategies.functional.auto_split import relevance_coverage_counts
from vtprune.testing import check_pipeline, make_signals

REGISTRY = build_registry(autoload=False)


def reference_counts(scores: list[float], valid: list[bool], total: int, temperature: float, trade: float) -> int:
    """Loop form: evaluate the objective at every c = 0..total and return the smallest maximiser."""
    real = [s for s, v in zip(scores, valid) if v]
    if not real or total <= 0:
        return 0
    top = max(real)
    weights = [math.exp((s - top) / temperature) for s in real]
    z = sum(weights)
    masses = sorted((w / z for w in weights), reverse=True)
    best_c, best = 0, None
    for c in range(0, min(total, len(masses)) + 1):
        value = sum(masses[:c]) + trade * (total - c) / total
        if best is None or value > best + 1e-12:
            best_c, best = c, value
    return best_c


rows = st.integers(1, 4)
tokens = st.integers(1, 12)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), b=rows, n=tokens, temperature=st.sampled_from([0.02, 0.05, 0.1, 0.5]),
       trade=st.sampled_from([0.0, 0.1, 0.3, 0.5, 1.0, 2.0]))
def test_counts_match_the_loop_objective(data, b: int, n: int, temperature: float, trade: float) -> None:
    # scores on a grid of 1/8 so that no mass sits within float error of the threshold
    scores = torch.tensor(data.draw(st.lists(st.lists(st.integers(-8, 8), min_size=n, max_size=n), min_size=b, max_size=b)),
                          dtype=torch.float32) / 8  # (B, N)
    valid = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=b, max_size=b)))  # (B, N)
    totals = torch.tensor(data.draw(st.lists(st.integers(0, n + 2), min_size=b, max_size=b)))  # (B,)
    got = relevance_coverage_counts(scores, valid, totals, temperature, trade)
    for r in range(b):
        real = int(valid[r].sum())
        want = reference_counts(scores[r].tolist(), valid[r].tolist(), int(totals[r]), temperature, trade)
        # a mass exactly at the threshold is a tie of the objective: either side is a maximiser
        assert 0 <= int(got[r]) <= min(int(totals[r]), max(real, 0)) or real == 0
        assert abs(int(got[r]) - want) <= _ties(scores[r], valid[r], int(totals[r]), temperature, trade), (r, got, want)


def _ties(scores: torch.Tensor, valid: torch.Tensor, total: int, temperature: float, trade: float) -> int:
    """How many masses equal the threshold (objective ties), 0 almost always."""
    if total <= 0 or not bool(valid.any()):
        return 0
    mass = torch.softmax((scores / temperature).masked_fill(~valid, float("-inf")), 0)
    return int(torch.isclose(mass, torch.tensor(trade / total), rtol=1e-5, atol=1e-9)[valid].sum())


@pytest.mark.parametrize("alloc", [AutoSplit(), GapSplit(drop=0.1)], ids=["auto", "gap"])
@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 5), n=st.integers(2, 20), pad=st.integers(0, 6), total=st.integers(0, 25), seed=st.integers(0, 10**6))
def test_batch_equals_alone_and_padding_is_ignored(alloc, b: int, n: int, pad: int, total: int, seed: int) -> None:
    """Every score-rule allocator (``auto``, and ``gap`` of ``zspaprune_auto``): rows are independent, padding never
    counts, counts stay within [0, total]."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(b, n, generator=g)  # (B, N)
    valid = torch.ones(b, n, dtype=torch.bool)  # (B, N)
    totals = torch.full((b,), total)  # (B,)
    together = alloc.allocate(totals, valid, scores).critical  # (B,)
    for r in range(b):
        alone = alloc.allocate(totals[r : r + 1], valid[r : r + 1], scores[r : r + 1]).critical
        assert int(alone) == int(together[r])
    # padding with very high (or very low) scores is never counted and changes nothing
    for fill in (10.0, -10.0):
        padded_scores = torch.cat([scores, torch.full((b, pad), fill)], 1)  # (B, N + pad)
        padded_valid = torch.cat([valid, torch.zeros(b, pad, dtype=torch.bool)], 1)  # (B, N + pad)
        assert torch.equal(alloc.allocate(totals, padded_valid, padded_scores).critical, together)
    assert bool(((together >= 0) & (together <= totals)).all())


def test_flat_relevance_goes_to_diversity_and_a_peak_is_kept() -> None:
    n, total = 64, 6
    flat = torch.zeros(1, n)  # (1, N)
    valid = torch.ones(1, n, dtype=torch.bool)
    alloc = AutoSplit(temperature=0.05, trade=0.5)
    assert int(alloc.allocate(torch.tensor([total]), valid, flat).critical) == 0
    peak = flat.clone()
    peak[0, 17] = 1.0  # one token far above the rest
    assert int(alloc.allocate(torch.tensor([total]), valid, peak).critical) == 1
    two = peak.clone()
    two[0, 40] = 1.0
    assert int(alloc.allocate(torch.tensor([total]), valid, two).critical) == 2
    assert int(alloc.allocate(torch.tensor([total]), valid, None).critical) == 0


def test_larger_budgets_never_get_fewer_critical_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(8, 64, generator=g) * 0.5  # (B, N)
    valid = torch.ones(8, 64, dtype=torch.bool)
    previous = torch.zeros(8, dtype=torch.long)
    for total in (1, 2, 4, 6, 12, 32, 64):
        crit = AutoSplit().allocate(torch.full((8,), total), valid, scores).critical
        assert bool((crit >= previous).all())
        previous = crit


@pytest.mark.parametrize("bad", [{"temperature": 0.0}, {"temperature": -1.0}, {"trade": -0.1}])
def test_bad_parameters_are_named(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        AutoSplit(**bad)


def test_stage_composes_and_meets_the_contract() -> None:
    pipeline = compose("zspaprune+auto", registry=REGISTRY)
    assert str(pipeline) == "prompt_cosine(pool=mean)+critical+fps+auto(temperature=0.2,trade=3.0)+pre_llm"
    sel = pipeline.select(make_signals([32, 32, 32], dim=16, seed=1), 6)
    assert sel.counts.tolist() == [6, 6, 6]
    check_pipeline(pipeline)
