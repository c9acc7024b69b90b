"""The index path of `Pipeline.select` (framework/dense.py) gives the mask path's `Selection` exactly.

The mask path is forced by passing ``visual_mask`` True everywhere (the same rows, so the same selection
is due); scores are quantised so that many tokens tie at the top-k boundary.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal  # noqa: F401  (Literal: the inherited stage parameter annotations resolve here)

import pytest
import torch

from vtprune.framework.errors import BudgetError

from vtprune.framework import Signals, build_registry, compose
from vtprune.framework.budget import resolve_count
from vtprune.framework.dense import index_path_applies, index_path_select
from vtprune.strategies.peer_stages import OfficialTopK
from vtprune.testing import check_stage

REGISTRY = build_registry(autoload=False)
INDEX_PRESETS = ("fastv", "pdrop", "fastervlm")
ARGSORT_RECIPE = "cls_attention(reduce=mean)+topk_official(op=argsort)+diversity.none+budget.split(critical=1.0)+vision"
#: FitPrune's ascending-sort deletion (the `fitprune` preset's selector) on the same tied scores.
SORT_DROP_RECIPE = "cls_attention(reduce=mean)+topk_official(op=sort_drop)+diversity.none+budget.split(critical=1.0)+vision"


def _signals(batch: int, tokens: int, seed: int, levels: int = 7) -> Signals:
    generator = torch.Generator().manual_seed(seed)
    attention = torch.randint(0, levels, (batch, 4, tokens), generator=generator).float()  # (B, H, N): many ties
    return Signals(
        visual=torch.randn(batch, tokens, 8, generator=generator),
        attention=attention,
        cls_attention=attention.flip(-1),
        prompt=torch.randn(batch, 3, 8, generator=generator),
    )


def _mask_path(pipeline):
    """An equal pipeline whose select never takes the index path (the cached fact set to False)."""
    clone = compose(pipeline, registry=REGISTRY)
    clone.__dict__["_index_path"] = False
    return clone


def _assert_same(fast, slow) -> None:
    assert torch.equal(fast.indices, slow.indices)
    assert torch.equal(fast.mask, slow.mask)
    assert torch.equal(fast.critical, slow.critical)
    assert fast.values is None and slow.values is None
    assert fast.sizes is None and fast.assignment is None


@pytest.mark.parametrize("recipe", INDEX_PRESETS + (ARGSORT_RECIPE, SORT_DROP_RECIPE))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("budget", [1, 5, 13, 39, 40, 41, 100])
def test_index_path_equals_mask_path(recipe: str, batch: int, budget: int) -> None:
    pipeline = compose(recipe, registry=REGISTRY)
    assert pipeline._index_path
    for seed in range(3):
        signals = _signals(batch, 40, seed)
        masked = dataclasses.replace(signals, visual_mask=torch.ones(batch, 40, dtype=torch.bool))  # as adapters pass it
        fast = pipeline.select(signals, budget)
        _assert_same(fast, _mask_path(pipeline).select(signals, budget))
        _assert_same(pipeline.select(masked, budget), fast)
        for given in (signals, masked):
            taken = index_path_select(pipeline, given, budget)
            assert (taken is not None) == (budget < 40)  # keep-all budgets take the mask path
        # each row alone gives its row of the batch
        for b in range(batch):
            alone = pipeline.select(signals.row(b), budget)
            assert torch.equal(alone.indices[0], fast.indices[b])


def test_index_path_declines_what_it_does_not_handle() -> None:
    pipeline = compose("fastv", registry=REGISTRY)
    signals = _signals(2, 40, 0)
    assert index_path_select(pipeline, signals, 0.5) is None  # float budgets: mask path
    assert index_path_select(pipeline, signals, [5, 6]) is None  # per-row budgets
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, -3:] = False  # a padded row
    padded = dataclasses.replace(signals, visual_mask=mask)
    assert index_path_select(pipeline, padded, 5) is None
    assert not index_path_applies(compose("zspaprune", registry=REGISTRY))  # a diversity stage adds tokens
    assert not index_path_applies(compose("divprune", registry=REGISTRY))


@pytest.mark.parametrize("name", sorted(REGISTRY.presets))
def test_resolve_count_agrees_with_resolve(name: str) -> None:
    allocator = compose(name, registry=REGISTRY).budget
    for tokens in (0, 1, 5, 7, 576, 577):
        for budget in (1, 5, 64, 600, 0.1, 0.25, 0.5, 0.333, 0.778, 1.0):
            try:
                expected = allocator.resolve(budget, torch.full((1,), tokens, dtype=torch.long))
            except BudgetError:  # a budget the allocator has no count for (VTW's withdraw: 0 or all): the same error
                with pytest.raises(BudgetError):
                    allocator.resolve_count(budget, tokens)
                continue
            assert allocator.resolve_count(budget, tokens) == int(expected[0]), (name, tokens, budget)


@pytest.mark.parametrize("rounding", ["half_up", "half_even", "floor", "ceil"])
def test_resolve_count_matches_resolve_budget(rounding: str) -> None:
    from vtprune.framework.budget import resolve_budget

    tokens = torch.arange(0, 700)
    for budget in (3, 0.5, 0.125, 0.1, 0.222, 0.75, 1.0):
        expected = resolve_budget(budget, tokens, rounding=rounding).tolist()
        assert [resolve_count(budget, n, rounding=rounding) for n in range(700)] == expected


@dataclasses.dataclass(frozen=True, eq=False)
class LowestIndex(OfficialTopK):
    """A broken index form: the first tokens, not the top-k its ``select`` picks."""

    name: ClassVar[str] = "lowest_index_form"

    def select_indices(self, scores: torch.Tensor, count: int) -> torch.Tensor:
        return torch.arange(count).expand(scores.shape[0], -1)  # (B, k)


def test_testing_kit_catches_an_index_form_that_disagrees_with_select() -> None:
    """A third-party critical selector whose ``select_indices`` picks other tokens than its ``select`` fails the
    kit's contract (unpadded rows take the index path, padded ones the mask path: ``padding invariance``)."""
    check_stage(OfficialTopK)  # the built-in index form passes
    with pytest.raises(AssertionError):
        check_stage(LowestIndex)
