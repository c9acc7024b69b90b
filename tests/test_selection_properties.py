"""Selection invariants, generated over every registered critical/diversity stage and preset.

For each pipeline and random ragged batch: indices ascending and unique per row, only real tokens,
count == min(budget, real tokens), the critical subset has the allocator's size, a batch gives
the same selection as each row alone, and a second run gives the same result (seeded).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtprune.framework import Signals, build_registry, compose, resolve_budget

from conftest import make_signals

_REGISTRY = build_registry(autoload=False)


def _pipelines() -> list[str]:
    recipes = [f"preset:{name}" for name in sorted(_REGISTRY.presets)]
    for name in sorted(_REGISTRY.stages["diversity"]):
        recipes.append(f"prompt_cosine+critical+diversity.{name}")
        recipes.append(f"relevance.none+diversity.{name}" if _REGISTRY.stages["diversity"][name].obj.adds_tokens else "")
    for name in sorted(_REGISTRY.stages["critical"]):
        recipes.append(f"prompt_cosine+{name}+diversity.none")
    for name in sorted(_REGISTRY.stages["relevance"]):
        recipes.append(f"relevance.{name}+critical+fps")
    for name in sorted(_REGISTRY.stages["budget"]):
        recipes.append(f"prompt_cosine+critical+fps+budget.{name}")
    return [r for r in dict.fromkeys(recipes) if r]


def _compose(recipe: str):
    """Compose; a stage recipe whose signals pre_llm lacks gets the first placement providing them."""
    if recipe.startswith("preset:"):
        return compose(recipe.removeprefix("preset:"), registry=_REGISTRY)
    needed = set()
    for term in recipe.split("+"):
        name = term.split("(")[0]
        kind, _, bare = name.rpartition(".")
        kinds = [kind] if kind else _REGISTRY.kinds_of(bare)
        needed |= _REGISTRY.stage(kinds[0], bare).requires
    for name, item in _REGISTRY.stages["placement"].items():
        if needed <= item.obj.provides | {"visual", "visual_mask"}:
            return compose(f"{recipe}+placement.{name}", registry=_REGISTRY)
    return compose(recipe, registry=_REGISTRY)


def _grid_for(tokens: int) -> tuple[int, int] | None:
    for h in range(int(tokens**0.5), 0, -1):
        if tokens % h == 0:
            return (h, tokens // h)
    return None


def _trim(signals: Signals, length: int) -> Signals:
    """One row cut to its first ``length`` tokens (every per-token field), mask dropped."""
    import dataclasses

    values = {}
    for f in dataclasses.fields(signals):
        value = getattr(signals, f.name)
        if f.name in ("visual", "clip_visual"):
            value = value[:, :length]
        elif f.name == "visual_keys":
            value = value[:, :length]
        elif f.name in ("attention", "cls_attention"):
            value = value[..., :length]
        elif f.name == "visual_mask":
            value = None
        values[f.name] = value
    return Signals(**values)


budgets = st.one_of(st.integers(min_value=1, max_value=40), st.floats(min_value=0.01, max_value=1.0))


@pytest.mark.parametrize("recipe", _pipelines())
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=24), min_size=1, max_size=4),
    budget=budgets,
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_selection_invariants(recipe: str, lengths: list[int], budget, seed: int) -> None:
    pipeline = _compose(recipe)
    tokens = max(lengths)
    signals = make_signals(lengths, seed=seed, grid=_grid_for(tokens) if len(set(lengths)) == 1 else None)
    if signals.grid is None:  # ragged rows: each its own grid, as adapters give images of different sizes
        signals = dataclasses.replace(signals, grids=torch.tensor([_grid_for(n) for n in lengths]))
    selection = pipeline.select(signals, budget)
    valid = signals.valid()
    expected = pipeline.budget.resolve(budget, valid.sum(1))
    assert torch.equal(selection.counts, expected), (selection.counts, expected)
    assert torch.equal(expected, resolve_budget(budget, valid.sum(1))) or pipeline.budget.name != "split"
    for row in range(len(lengths)):
        kept = selection.row_indices(row)
        assert torch.all(kept[1:] > kept[:-1]), "indices must be ascending and unique"
        assert bool(valid[row, kept].all()), "padding selected"
        assert not bool(selection.mask[row, int(selection.counts[row]) :].any())
    # the critical subset: only kept slots, and its size is what the allocator asked for
    assert not bool((selection.critical & ~selection.mask).any())
    # batch == per-sample
    for row in range(len(lengths)):
        alone = pipeline.select(signals.row(row), budget)
        assert torch.equal(alone.row_indices(0), selection.row_indices(row))
        assert torch.equal(alone.critical[0][alone.mask[0]], selection.critical[row][selection.mask[row]])
    # padding never matters: a row trimmed to its own tokens (and given its grid as `grid`) selects the same
    if signals.grid is None:
        for row, length in enumerate(lengths):
            trimmed = dataclasses.replace(_trim(signals.row(row), length), grids=None, grid=_grid_for(length))
            alone = pipeline.select(trimmed, budget)
            assert torch.equal(alone.row_indices(0), selection.row_indices(row))
    # determinism
    again = pipeline.select(signals, budget)
    assert torch.equal(again.indices, selection.indices) and torch.equal(again.critical, selection.critical)


@pytest.mark.parametrize("recipe", _pipelines())
def test_budget_at_or_above_tokens_keeps_all(recipe: str) -> None:
    pipeline = _compose(recipe)
    signals = make_signals([9, 6], seed=3, grid=None)
    for budget in (9, 100, 1.0):
        selection = pipeline.select(signals, budget)
        assert torch.equal(selection.kept_mask(9), signals.valid())


@pytest.mark.parametrize("recipe", [r for r in _pipelines() if "diversity.none" not in r and "relevance.none" not in r])
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
