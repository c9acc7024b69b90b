"""Peer presets: compose(name).select(...) == the tested functional re-implementation of the official code.

For each preset: equality on seeded inputs (including near-ties), batch > 1 == each row alone,
the official count rules for fractional budgets, canonical round trip, and capability errors.
"""

from __future__ import annotations

import pytest
import torch

from vtprune.framework import MissingSignalError, Signals, VtpruneError, build_registry, compose
from vtprune.strategies.functional import (
    cdpruner_select,
    dart_select,
    divprune_keep_count,
    divprune_select,
    fastv_keep_count,
    fastv_select,
    pdrop_select,
    pdrop_stage_counts,
    pooling_select,
    random_select,
    vispruner_select,
    visionzip_select,
)

_REGISTRY = build_registry(autoload=False)
PEERS = ("fastv", "pdrop", "visionzip", "divprune", "cdpruner", "dart", "vispruner", "random", "pooling")


def _signals(lengths, dim=8, seed=0, heads=3, prompt_len=6, grid=None, ties=False) -> Signals:
    g = torch.Generator().manual_seed(seed)
    batch, tokens = len(lengths), max(lengths)
    valid = torch.arange(tokens).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    attention = torch.softmax(torch.randn(batch, heads, tokens, generator=g), dim=-1)
    cls = torch.softmax(torch.randn(batch, heads, tokens, generator=g), dim=-1)
    if ties:  # near-ties and exact ties: few distinct values
        attention = torch.randint(0, 3, (batch, heads, tokens), generator=g).float() / 8
        cls = torch.randint(0, 3, (batch, heads, tokens), generator=g).float() / 8
    return Signals(
        visual=torch.randn(batch, tokens, dim, generator=g),
        visual_mask=valid,
        prompt=torch.randn(batch, prompt_len, dim, generator=g),
        prompt_mask=torch.ones(batch, prompt_len, dtype=torch.bool),
        attention=attention,
        visual_keys=torch.randn(batch, tokens, 2, 4, generator=g),
        prompt_keys=torch.randn(batch, prompt_len, 2, 4, generator=g),
        clip_visual=torch.randn(batch, tokens, 6, generator=g),
        clip_text=torch.randn(batch, 2, 6, generator=g),
        clip_text_mask=torch.ones(batch, 2, dtype=torch.bool),
        cls_attention=cls,
        grid=grid,
    )


def _kept(signals: Signals, selection) -> torch.Tensor:
    return selection.kept_mask(signals.num_tokens)


def _check_batch_equals_rows(pipeline, signals, budget) -> None:
    whole = pipeline.select(signals, budget)
    for row in range(signals.batch_size):
        alone = pipeline.select(signals.row(row), budget)
        assert torch.equal(alone.row_indices(0), whole.row_indices(row))
        assert torch.equal(alone.critical[0][alone.mask[0]], whole.critical[row][whole.mask[row]])
        if whole.values is not None:
            count = int(whole.counts[row])
            assert torch.equal(alone.values[0, :count], whole.values[row, :count])


# -- FastV / PyramidDrop ------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_fastv_matches_official(seed: int, ties: bool) -> None:
    signals = _signals([40, 33, 40], seed=seed, ties=ties)
    pipeline = compose("fastv", registry=_REGISTRY)
    for budget in (1, 7, 16, 33):
        expected = fastv_select(signals.attention, budget, signals.valid())
        assert torch.equal(_kept(signals, pipeline.select(signals, budget)), expected)
    _check_batch_equals_rows(pipeline, signals, 9)
    assert [(d.where, d.layer) for d in pipeline.placement.drops(0.5)] == [("layer", 2)]


def test_fastv_count_rule_for_a_fraction() -> None:
    pipeline = compose("fastv", registry=_REGISTRY)
    for n in (1, 2, 5, 10, 14, 576):
        for drop in (0.5, 0.75, 0.875, 0.25):
            got = int(pipeline.budget.resolve(1 - drop, torch.tensor([n]))[0])
            assert got == max(1, fastv_keep_count(n, drop)), (n, drop)
    # half to even: 10 * 0.25 = 2.5 -> 2 (the default rule would give 3)
    assert int(pipeline.budget.resolve(0.25, torch.tensor([10]))[0]) == 2


@pytest.mark.parametrize("ties", [False, True])
def test_pdrop_matches_official(ties: bool) -> None:
    signals = _signals([30, 21], seed=4, ties=ties)
    pipeline = compose("pdrop", registry=_REGISTRY)
    for budget in (0.5, 0.25, 10):
        counts = pipeline.budget.resolve(budget, signals.valid().sum(1))
        expected = pdrop_select(signals.attention, counts, signals.valid())
        assert torch.equal(_kept(signals, pipeline.select(signals, budget)), expected)
    _check_batch_equals_rows(pipeline, signals, 0.5)


def test_pdrop_schedule_counts_follow_the_official_rule() -> None:
    """Chaining the schedule's drops with the pdrop allocator gives int(N0 * ratio ** (s + 1))."""
    pipeline = compose("pdrop", registry=_REGISTRY)
    drops = pipeline.placement.drops(0.5)
    assert [(d.where, d.layer, d.budget) for d in drops] == [("layer", 8, 0.5), ("layer", 16, 0.5), ("layer", 24, 0.5)]
    for n0 in range(1, 700):
        present, counts = torch.tensor([n0]), []
        for drop in drops:
            present = pipeline.budget.resolve(drop.budget, present)
            counts.append(int(present[0]))
        official = pdrop_stage_counts(n0, (8, 16, 24), 0.5)
        assert counts == [max(1, c) for c in official], n0


# -- VisionZip ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
def test_visionzip_matches_official(ties: bool) -> None:
    signals = _signals([90, 70, 90], seed=5, ties=ties)
    pipeline = compose("visionzip", registry=_REGISTRY)
    assert pipeline.placement.name == "vision"
    for budget, dominant, contextual in ((64, 54, 10), (32, 27, 5), (12, 10, 2)):
        keep, values, dominant_mask = visionzip_select(
            signals.visual, signals.cls_attention, signals.visual_keys, dominant, contextual, signals.valid()
        )
        selection = pipeline.select(signals, budget)
        assert torch.equal(_kept(signals, selection), keep)
        assert torch.equal(selection.critical, dominant_mask.gather(1, selection.indices) & selection.mask)
        assert torch.equal(selection.values, values.gather(1, selection.indices.unsqueeze(-1).expand(-1, -1, 8)))
    _check_batch_equals_rows(pipeline, signals, 20)


def test_visionzip_parameters() -> None:
    signals = _signals([80], seed=6)
    pipeline = compose("visionzip", registry=_REGISTRY, dominant=53, contextual=10, keep_cls=True)
    assert pipeline.budget.keep_cls is True
    keep, _, _ = visionzip_select(signals.visual, signals.cls_attention, signals.visual_keys, 53, 10)
    assert torch.equal(_kept(signals, pipeline.select(signals, 63)), keep)
    assert compose(str(pipeline), registry=_REGISTRY) == pipeline


# -- DivPrune -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_divprune_matches_official(seed: int) -> None:
    signals = _signals([50, 37], seed=seed)
    pipeline = compose("divprune", registry=_REGISTRY)
    for budget in (1, 5, 20):
        assert torch.equal(_kept(signals, pipeline.select(signals, budget)), divprune_select(signals.visual, budget, signals.valid()))
    _check_batch_equals_rows(pipeline, signals, 6)


def test_divprune_ratio_and_duplicate_quirk() -> None:
    pipeline = compose("divprune", registry=_REGISTRY)
    for n in (10, 25, 576, 35):
        assert int(pipeline.budget.resolve(0.098, torch.tensor([n]))[0]) == max(1, divprune_keep_count(n, 0.098))
    # exact duplicates: the official greedy re-picks and keeps fewer; ours keeps a superset, exactly k
    base = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    visual = base.repeat(4, 1).unsqueeze(0)  # (1, 12, 4): 3 distinct tokens
    signals = Signals(visual=visual)
    official = divprune_select(visual, 6)
    ours = _kept(signals, pipeline.select(signals, 6))
    assert int(ours.sum()) == 6 and int(official.sum()) < 6
    assert bool((official <= ours).all())


# -- CDPruner -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_cdpruner_matches_official(seed: int) -> None:
    signals = _signals([40, 29], seed=seed, dim=32)  # full-rank kernel for every budget used
    pipeline = compose("cdpruner", registry=_REGISTRY)
    for budget in (1, 8, 20):
        expected = cdpruner_select(signals.visual, signals.clip_visual, signals.clip_text, budget, signals.valid(), signals.clip_text_mask)
        assert torch.equal(_kept(signals, pipeline.select(signals, budget)), expected)
    theta = compose("cdpruner", registry=_REGISTRY, theta=0.5)
    expected = cdpruner_select(signals.visual, signals.clip_visual, signals.clip_text, 8, signals.valid(), theta=0.5)
    assert torch.equal(_kept(signals, theta.select(signals, 8)), expected)
    _check_batch_equals_rows(pipeline, signals, 7)


def test_cdpruner_rank_deficient_kernel_keeps_exact_counts() -> None:
    """Past the kernel's rank the official greedy hits NaN and re-picks token 0 (keeps fewer);
    ours keeps exactly k tokens, a superset of the official ones."""
    signals = _signals([30], seed=1, dim=4)
    official = cdpruner_select(signals.visual, signals.clip_visual, signals.clip_text, 12)
    ours = _kept(signals, compose("cdpruner", registry=_REGISTRY).select(signals, 12))
    assert int(ours.sum()) == 12 and bool((official <= ours).all())


# -- DART ---------------------------------------------------------------------------------------------


def test_dart_faithful_matches_official() -> None:
    signals = _signals([200, 170], seed=7, prompt_len=9)
    pipeline = compose("dart", registry=_REGISTRY, faithful=True)
    assert pipeline.diversity.exact_counts is False
    for budget in (128, 64, 30):
        keep, pivots = dart_select(
            signals.visual, signals.visual_keys, signals.prompt, signals.prompt_keys, signals.valid(),
            signals.prompt_mask, budget=budget, image_token_start_index=35,
        )
        selection = pipeline.select(signals, budget)
        assert torch.equal(_kept(signals, selection), keep)
        assert torch.equal(selection.critical, pivots.gather(1, selection.indices) & selection.mask)
    assert selection.counts.tolist() == [4 + 8 * (30 // 8)] * 2
    assert pipeline.select(signals, 128).counts.tolist() == [132, 132]  # the official budget + 4


def test_dart_default_keeps_exactly_the_budget() -> None:
    signals = _signals([60, 45], seed=8)
    pipeline = compose("dart", registry=_REGISTRY)
    assert pipeline.diversity.exact_counts is True
    for budget in (4, 5, 13, 30):
        selection = pipeline.select(signals, budget)
        assert selection.counts.tolist() == [budget, budget]
        _, pivots = dart_select(signals.visual, signals.visual_keys, signals.prompt, signals.prompt_keys, signals.valid(), budget=8)
        assert torch.equal(selection.critical, pivots.gather(1, selection.indices) & selection.mask)
    _check_batch_equals_rows(pipeline, signals, 17)


# -- VisPruner ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
def test_vispruner_matches_official(ties: bool) -> None:
    signals = _signals([60, 47], seed=9, ties=ties)
    pipeline = compose("vispruner", registry=_REGISTRY)
    assert pipeline.placement.name == "vision"
    for budget in (2, 16, 20, 33):
        keep, important = vispruner_select(signals.visual, signals.cls_attention, budget, signals.valid())
        selection = pipeline.select(signals, budget)
        assert torch.equal(_kept(signals, selection), keep)
        assert torch.equal(selection.critical, important.gather(1, selection.indices) & selection.mask)
    _check_batch_equals_rows(pipeline, signals, 12)


# -- random / pooling ---------------------------------------------------------------------------------


def test_random_matches_random_select() -> None:
    signals = _signals([30, 22, 30], seed=10)
    for seed in (0, 3):
        pipeline = compose("random", registry=_REGISTRY, seed=seed)
        for budget in (1, 9, 0.5):
            counts = pipeline.budget.resolve(budget, signals.valid().sum(1))
            expected = random_select(signals.valid(), counts, seed)
            assert torch.equal(_kept(signals, pipeline.select(signals, budget)), expected)
    _check_batch_equals_rows(compose("random", registry=_REGISTRY), signals, 5)


def test_pooling_matches_pooling_select_and_keeps_exact_counts() -> None:
    signals = _signals([576, 576], seed=11, grid=(24, 24))
    pipeline = compose("pooling", registry=_REGISTRY)
    for budget in (64, 144, 36, 1):
        keep, values = pooling_select(signals.visual, (24, 24), budget, signals.valid())
        selection = pipeline.select(signals, budget)
        assert torch.equal(_kept(signals, selection), keep)
        assert torch.equal(selection.values, values.gather(1, selection.indices.unsqueeze(-1).expand(-1, -1, 8)))
    for budget in (192, 29, 577):
        assert pipeline.select(signals, budget).counts.tolist() == [min(budget, 576)] * 2
    # 192 -> the 14x13 grid (182 windows) plus one more window in 10 of the 14 bands of rows
    selection = pipeline.select(signals, 192)
    first = selection.indices[0, selection.mask[0]]
    assert torch.allclose(selection.values[0, 0], signals.visual[0, [r * 24 + c for r in range(2) for c in range(2)]].mean(0), atol=1e-6)
    assert int(first[0]) == 0
    _check_batch_equals_rows(pipeline, signals, 50)


# -- composition, capability errors ------------------------------------------------------------------


@pytest.mark.parametrize("name", PEERS)
def test_round_trip(name: str) -> None:
    pipeline = compose(name, registry=_REGISTRY)
    assert pipeline.preset == name
    assert compose(str(pipeline), registry=_REGISTRY) == pipeline
    assert compose(pipeline.to_dict(), registry=_REGISTRY) == pipeline
    assert _REGISTRY.preset(name).description


@pytest.mark.parametrize(
    "recipe, signal",
    [
        ("fastv+pre_llm", "attention"),
        ("pdrop+vision", "attention"),
        ("visionzip+pre_llm", "visual_keys"),
        ("cdpruner+vision", "clip_text"),
        ("cdpruner+pre_llm", "clip_visual"),
        ("dart+vision", "prompt_keys"),
    ],
)
def test_capability_error_names_the_signal(recipe: str, signal: str) -> None:
    with pytest.raises(VtpruneError, match=f"needs signal '{signal}'"):
        compose(recipe, registry=_REGISTRY)


def test_missing_signal_at_select_time() -> None:
    bare = Signals(visual=torch.randn(1, 10, 4))
    for name in ("fastv", "visionzip", "cdpruner", "dart", "vispruner"):
        with pytest.raises(MissingSignalError):
            compose(name, registry=_REGISTRY).select(bare, 4)
