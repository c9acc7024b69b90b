"""The ``gap`` allocator (preset ``zspaprune_auto``): the relevant set before the first relevance drop, per row.

The functional rule is compared with a plain loop re-implementation (sort the real scores, walk down the top
``window + 1`` until a fall of at least ``drop``, extend a set of two or more, cap at ``total - reserve``), then the
allocator's properties: counts within [0, max(total - reserve, 0)], one standout token keeps one critical slot, a set
of near-identical standouts keeps all of them, flat relevance and a set larger than the window go to diversity; and
the preset meets the kit's contract. Batch == alone and padding: tests/strategies/test_auto_split.py, for every
score-rule allocator.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtprune.framework import build_registry, compose
from vtprune.strategies.budget import GapSplit
from vtprune.strategies.functional.auto_split import relevance_gap_counts
from vtprune.testing import check_preset, make_signals

REGISTRY = build_registry(autoload=False)


def reference_count(scores: list[float], valid: list[bool], total: int, drop: float, reserve: int, window: int,
                    extend: float) -> int:
    """Loop form of the rule (module doc)."""
    real = sorted((s for s, v in zip(scores, valid) if v), reverse=True)[: window + 1]
    size = 0
    for k in range(1, len(real)):
        if real[k - 1] - real[k] >= drop:
            size = k
            break
    if size >= 2:
        size = math.ceil(extend * size)
    return max(0, min(size, total - reserve))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), b=st.integers(1, 4), n=st.integers(1, 14), drop=st.sampled_from([0.125, 0.25, 0.5]),
       reserve=st.integers(0, 3), window=st.integers(1, 10), extend=st.sampled_from([1.0, 1.25, 1.5, 2.0]))
def test_counts_match_the_loop_rule(data, b: int, n: int, drop: float, reserve: int, window: int, extend: float) -> None:
    # scores on a grid of 1/8 so that every fall is exact in float32
    scores = torch.tensor(data.draw(st.lists(st.lists(st.integers(-8, 8), min_size=n, max_size=n), min_size=b, max_size=b)),
                          dtype=torch.float32) / 8  # (B, N)
    valid = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=b, max_size=b)))  # (B, N)
    totals = torch.tensor(data.draw(st.lists(st.integers(0, n + 2), min_size=b, max_size=b)))  # (B,)
    got = relevance_gap_counts(scores, valid, totals, drop, reserve, window, extend)  # (B,)
    for r in range(b):
        want = reference_count(scores[r].tolist(), valid[r].tolist(), int(totals[r]), drop, reserve, window, extend)
        assert int(got[r]) == want, (r, scores[r], valid[r], int(totals[r]))
        assert 0 <= int(got[r]) <= max(int(totals[r]) - reserve, 0) and int(got[r]) <= math.ceil(extend * window)


def test_standout_sets_flat_relevance_and_the_window() -> None:
    n, valid = 64, torch.ones(1, 64, dtype=torch.bool)
    alloc = GapSplit(drop=0.3, reserve=2, window=8, extend=1.0)
    flat = torch.full((1, n), -0.2)  # (1, N)
    flat[0, ::2] += 0.05  # small wiggles, no drop of 0.3
    assert int(alloc.allocate(torch.tensor([6]), valid, flat).critical) == 0
    one = flat.clone()
    one[0, 17] = 0.55  # a single named object
    assert int(alloc.allocate(torch.tensor([6]), valid, one).critical) == 1
    crowd = flat.clone()
    crowd[0, [3, 9, 20, 33, 41]] = torch.tensor([0.55, 0.52, 0.50, 0.47, 0.45])  # five near-identical named objects
    got = [int(alloc.allocate(torch.tensor([k]), valid, crowd).critical) for k in (1, 2, 4, 6, 12)]
    assert got == [0, 0, 2, 4, 5]  # all of the set, at most total - reserve
    extended = GapSplit(drop=0.3, reserve=2, window=8, extend=1.5)
    got = [int(extended.allocate(torch.tensor([k]), valid, crowd).critical) for k in (4, 6, 12, 20)]
    assert got == [2, 4, 8, 8]  # ceil(1.5 x 5) = 8 when the budget has room; a single standout is not extended
    assert int(extended.allocate(torch.tensor([12]), valid, one).critical) == 1
    big = flat.clone()
    big[0, :12] = 0.5  # a set larger than the window: relevance is spread, buy coverage
    assert int(alloc.allocate(torch.tensor([12]), valid, big).critical) == 0
    assert int(alloc.allocate(torch.tensor([6]), valid, None).critical) == 0


@pytest.mark.parametrize("bad", [{"drop": 0.0}, {"drop": -0.1}, {"reserve": -1}, {"window": 0}, {"extend": 0.5}])
def test_bad_parameters_are_named(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        GapSplit(**bad)
    with pytest.raises(ValueError, match=next(iter(bad))):
        relevance_gap_counts(torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool), torch.tensor([2]),
                             **{"drop": 0.3, "reserve": 2, "window": 8, "extend": 1.5, **bad})


def test_preset_composes_and_meets_the_contract() -> None:
    pipeline = compose("zspaprune_auto", registry=REGISTRY)
    assert str(pipeline) == "prompt_cosine(pool=mean)+critical+fps+gap(drop=0.35,reserve=2,window=8,extend=1.5)+pre_llm"
    sel = pipeline.select(make_signals([32, 32, 32], dim=16, seed=1), 6)
    assert sel.counts.tolist() == [6, 6, 6]
    check_preset("zspaprune_auto", registry=REGISTRY)
