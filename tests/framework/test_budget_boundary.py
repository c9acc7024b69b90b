"""Budgets: one resolution helper with a named rounding, every preset's counts unchanged; validation
and normalisation once, at the boundary (`normalize_budget`, `prune`, `PruneHandle.budget`).

The reference counts below are the formulas the allocators used before they shared
`resolve_budget` / `scaled_counts`, written independently in plain Python (one row at a time).
"""

from __future__ import annotations

import math

import pytest
import torch

from vtprune.framework import BudgetError, VtpruneError, build_registry, compose, normalize_budget
from vtprune.framework.budget import ROUNDINGS, resolve_budget, round_counts, scaled_counts
from vtprune.strategies.budget import critical_mass_counts

_REGISTRY = build_registry(autoload=False)
LENGTHS = list(range(0, 301)) + [576, 729, 1024, 2880, 11520]
FRACTIONS = [k / 64 for k in range(1, 65)] + [0.098, 0.1, 0.111, 0.25, 0.3, 1 / 3, 0.7, 0.9, 0.95, 1e-3, 0.5 + 1e-12]
INTS = [1, 2, 3, 7, 16, 63, 64, 100, 128, 192, 576, 5000]
TOTALS = list(range(0, 301)) + [576, 1000, 2880]


def _count(budget, n: int, rule) -> int:
    """The pre-refactor resolve rule: min(budget, n) for an int; rule(n * f) in [1, n] for a fraction."""
    if isinstance(budget, int):
        return min(budget, n)
    return min(max(rule(n * budget), 1), n)


def _half_up(x: float) -> int:
    return math.floor(x + 0.5)


# Allocator -> (resolve reference, critical reference(total)) as the pre-refactor code computed them.
_RESOLVE = {
    "split": _half_up,  # BudgetAllocator.resolve default: floor(f * n + 0.5)
    "dynamic": _half_up,
    "visionzip": _half_up,
    "vispruner": _half_up,
    "dart": _half_up,
    "mustdrop_split": _half_up,  # BudgetAllocator.resolve default (new allocator, issue 14)
    "fastv": round,  # torch.round: half to even, as Python's round
    "divprune_ratio": lambda x: int(round(x)),
    "pdrop": int,  # torch.floor on a non-negative value = int()
    "gprune": int,  # the official topk(int(keep_ratio * n))
    # adaptive video allocators (issue 15): the resolved count is the method's target (its retention ratio)
    "fastvid": _half_up,
    "holitom": round,  # half to even, as the official round(length * ratio)
    "prunevid": _half_up,
    "auto": _half_up,  # the mass rule (issue 18): the default resolve; its split is score-dependent
    "gap": _half_up,  # zspaprune_auto (issue 18): the default resolve; its split is score-dependent
    "prumerge": _half_up,  # PruMerge: the default resolve gives the cap on its adaptive IQR count
}


def _critical(stage, total: int) -> int:
    name = stage.name
    if name == "split":
        return min(math.floor(total * stage.critical + 0.5), total)
    if name == "visionzip":
        return min(math.floor(total * stage.dominant / (stage.dominant + stage.contextual) + 0.5), total)
    if name == "vispruner":
        return min(int(total * stage.important_ratio), total)
    if name == "dart":
        return min(stage.pivot_image, total)
    if name in ("fastv", "pdrop", "gprune"):
        return total
    if name == "withdraw":  # VTW: nothing is selected, covered rows are kept whole by Pipeline.select
        return 0
    if name == "divprune_ratio":
        return 0
    if name in ("fastvid", "holitom", "prunevid", "prumerge"):  # the method keeps its own count: nothing is critical
        return 0
    if name == "mustdrop_split":  # critical = tokens scoring >= PASS_TIER: none with the all-zero scores used here
        return 0
    if name == "gap":  # zspaprune_auto: the all-zero scores used here have no relevance drop, so no relevant set
        return 0
    raise AssertionError(name)


@pytest.mark.parametrize("preset", sorted(_REGISTRY.presets))
def test_every_preset_resolves_counts_as_before(preset: str) -> None:
    stage = compose(preset, registry=_REGISTRY).budget
    lengths = torch.tensor(LENGTHS)
    if stage.adaptive_counts and stage.name not in _RESOLVE:  # SparseVLM: every real token is a candidate (adapt())
        for budget in FRACTIONS + INTS:
            assert stage.resolve(budget, lengths).tolist() == LENGTHS, (preset, budget)
        return
    if stage.name == "withdraw":  # VTW: no token (budget 0) or all of them; a count between is a clear error
        assert stage.resolve(0, lengths).tolist() == [0] * len(LENGTHS)
        assert stage.resolve(1.0, lengths).tolist() == LENGTHS
        assert stage.resolve(20_000, lengths).tolist() == LENGTHS
        for budget in FRACTIONS + INTS:
            if budget == 1.0 or budget >= max(LENGTHS):
                continue
            with pytest.raises(BudgetError, match="withdraw"):
                stage.resolve(budget, lengths)
        return
    rule = _RESOLVE[stage.name]
    if stage.name == "gprune":  # adaptive: a fraction's count needs the row's views (adapt); one view = as before
        _check_gprune_counts(stage, lengths, rule)
        return
    for budget in FRACTIONS + INTS:
        got = stage.resolve(budget, lengths).tolist()
        assert got == [_count(budget, n, rule) for n in LENGTHS], (preset, budget)


def _check_gprune_counts(stage, lengths: torch.Tensor, rule) -> None:
    """``budget.gprune``: an int resolves as before; a fraction resolves to every token (the bound) and ``adapt`` on
    rows of one view (no ``view_index``) gives the pre-refactor count."""
    from vtprune.framework.signals import Signals

    valid = torch.arange(max(LENGTHS)).unsqueeze(0) < lengths.unsqueeze(1)  # (B, N)
    signals = Signals(visual=torch.zeros(*valid.shape, 1), visual_mask=valid)
    for budget in FRACTIONS + INTS:
        resolved = stage.resolve(budget, lengths)
        if isinstance(budget, float):
            assert resolved.tolist() == LENGTHS, budget
        counts = stage.adapt(signals, budget, resolved, valid, None).total.tolist()
        assert counts == [_count(budget, n, rule) for n in LENGTHS], budget


@pytest.mark.parametrize("preset", sorted(_REGISTRY.presets))
def test_every_preset_splits_as_before(preset: str) -> None:
    stage = compose(preset, registry=_REGISTRY).budget
    if stage.name == "dynamic":
        pytest.skip("score-dependent: covered by test_dynamic_split_bounds_as_before")
    if stage.name == "auto":
        pytest.skip("score-dependent: covered by tests/strategies/test_auto_split.py")
    if stage.adaptive_counts and stage.name not in _RESOLVE:  # mustdrop_split: the budget is its cap, resolved as before
        pytest.skip("adaptive count from the data (adapt, not allocate): covered by tests/strategies/test_sparsevlm.py")
    totals = torch.tensor(TOTALS)
    valid = torch.ones(len(TOTALS), 4, dtype=torch.bool)
    critical = stage.allocate(totals, valid, torch.zeros(len(TOTALS), 4)).critical.tolist()
    assert critical == [_critical(stage, t) for t in TOTALS]


@pytest.mark.parametrize(
    "recipe",
    ["zspaprune+split(critical=0.3)", "zspaprune+split(critical=0.55)", "zspaprune+split(critical=0.0)",
     "visionzip+budget.visionzip(dominant=53,contextual=10)", "visionzip+budget.visionzip(dominant=5,contextual=3)",
     "vispruner+budget.vispruner(important_ratio=0.3)", "vispruner+budget.vispruner(important_ratio=0.75)"],
)
def test_split_parameters_sweep_as_before(recipe: str) -> None:
    stage = compose(recipe, registry=_REGISTRY).budget
    totals = torch.tensor(TOTALS)
    valid = torch.ones(len(TOTALS), 4, dtype=torch.bool)
    critical = stage.allocate(totals, valid, None).critical.tolist()
    assert critical == [_critical(stage, t) for t in TOTALS]


def test_dynamic_split_bounds_as_before() -> None:
    stage = compose("zspaprune_dynamic", registry=_REGISTRY).budget
    gen = torch.Generator().manual_seed(0)
    totals = torch.tensor(TOTALS)
    scores = torch.randn(len(TOTALS), 40, generator=gen)
    valid = torch.ones_like(scores, dtype=torch.bool)
    critical = stage.allocate(totals, valid, scores).critical.tolist()
    wanted = critical_mass_counts(scores, valid, stage.mass, stage.temperature).tolist()
    for total, want, got in zip(TOTALS, wanted, critical):
        low = math.floor(total * stage.min_critical + 0.5)
        high = math.floor(total * stage.max_critical + 0.5)
        assert got == min(min(max(want, low), high), total)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_round_counts_rules(rounding: str) -> None:
    values = torch.tensor([0.0, 0.5, 1.5, 2.5, 2.4999, 2.5001, 3.0, 7.9])
    reference = {"half_up": lambda x: math.floor(x + 0.5), "half_even": round, "floor": math.floor, "ceil": math.ceil}[rounding]
    assert round_counts(values, rounding).tolist() == [reference(float(v)) for v in values.double()]


def test_unknown_rounding_lists_the_rules() -> None:
    with pytest.raises(ValueError, match="half_up, half_even, floor, ceil"):
        resolve_budget(0.5, torch.tensor([4]), rounding="banker")


def test_resolve_budget_and_scaled_counts_edges() -> None:
    assert resolve_budget(0.01, torch.tensor([0, 1, 10, 300]), rounding="floor").tolist() == [0, 1, 1, 3]
    assert resolve_budget(7, torch.tensor([0, 3, 7, 9])).tolist() == [0, 3, 7, 7]
    assert scaled_counts(torch.tensor([0, 3, 10]), 1.0, rounding="ceil").tolist() == [0, 3, 10]
    assert scaled_counts(torch.tensor([63]), 53, 63).tolist() == [53]


# -- validation and normalisation at the boundary ---------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 1.5, 0.0, "abc", "64", None, True, float("nan"), float("inf"), [], (), [4, 0], [0.5, "x"], {"a": 1}])
def test_normalize_budget_rejects(bad) -> None:
    with pytest.raises(BudgetError, match="budget"):
        normalize_budget(bad)


def test_normalize_budget_names_the_bad_entry() -> None:
    with pytest.raises(BudgetError, match=r"budget\[1\]: budget must be a positive token count, got 0"):
        normalize_budget([4, 0, 3])


def test_normalize_budget_values() -> None:
    assert normalize_budget(64) == 64 and type(normalize_budget(64)) is int
    assert normalize_budget(0.25) == 0.25
    assert normalize_budget([16, 0.5]) == (16, 0.5)
    assert normalize_budget((3,)) == (3,)
    assert normalize_budget(torch.tensor([8, 4])) == (8, 4) and all(type(b) is int for b in normalize_budget(torch.tensor([8, 4])))
    assert normalize_budget(torch.tensor([0.5, 0.25])) == (0.5, 0.25)
    assert normalize_budget(torch.tensor(12)) == 12
    with pytest.raises(BudgetError, match="1-D"):
        normalize_budget(torch.ones(2, 2, dtype=torch.long))


def test_budget_error_is_the_yaml_paths_error() -> None:
    """The YAML path (experiments.config) reports `validate_budget`'s message; prune gives the same text."""
    from vtprune.framework.budget import validate_budget

    for bad in (0, 1.5, "abc"):
        with pytest.raises(BudgetError) as expected:
            validate_budget(bad)
        with pytest.raises(BudgetError) as got:
            normalize_budget(bad)
        assert str(got.value) == str(expected.value)
        assert isinstance(got.value, VtpruneError)


# -- prune() and the handle's setter ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    from adapter_fixtures import tiny_llava

    return tiny_llava(layers=2)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "abc", [], [4, 0], None])
def test_prune_rejects_a_bad_budget_before_attaching(tiny_model, bad) -> None:
    from adapter_fixtures import record_hooks

    from vtprune.framework import prune

    before = record_hooks(tiny_model)
    with pytest.raises(BudgetError, match="budget"):
        prune(tiny_model, "zspaprune", budget=bad)
    assert record_hooks(tiny_model) == before


def test_handle_budget_setter_validates_and_keeps_the_old_value(tiny_model) -> None:
    from adapter_fixtures import forward_logits, llava_inputs, record_hooks

    from vtprune.framework import prune

    inputs = llava_inputs(tiny_model, images_per_sample=(1,), seed=1)
    forward_logits(tiny_model, inputs)  # transformers adds its own output-recording hooks on a first forward
    before = record_hooks(tiny_model)
    with prune(tiny_model, "zspaprune", budget=[3, 5]) as handle:
        assert handle.budget == (3, 5) and handle._attachment.budget == (3, 5)
        for bad in (0, -1, 1.5, "abc", [], [2, 0.0]):
            with pytest.raises(BudgetError, match="budget"):
                handle.budget = bad
            assert handle.budget == (3, 5)
        handle.budget = torch.tensor([4, 2])
        assert handle.budget == (4, 2) and all(type(b) is int for b in handle.budget)
        handle.budget = 0.5
        assert handle.budget == 0.5
        handle.budget = 3
        forward_logits(tiny_model, inputs)
        assert handle.last_selection.counts.tolist() == [3]
    assert record_hooks(tiny_model) == before


# -- the budget 0: a withdrawing placement only (VTW) --------------------------------------------------


def test_zero_budget_is_a_budget_only_where_allowed() -> None:
    assert normalize_budget(0, allow_zero=True) == 0
    assert normalize_budget([0, 5, 1.0], allow_zero=True) == (0, 5, 1.0)
    assert normalize_budget(torch.tensor([0, 2]), allow_zero=True) == (0, 2)
    for bad in (0.0, -1, [0, 0.0]):  # the fraction 0.0 and negative counts stay refused
        with pytest.raises(BudgetError, match="budget"):
            normalize_budget(bad, allow_zero=True)
    with pytest.raises(BudgetError, match=r"budget\[0\]: .*placement\.withdraw"):
        normalize_budget([0, 3])
    signals = __import__("vtprune.testing", fromlist=["make_signals"]).make_signals([5, 3], seed=0)
    assert compose("vtw", registry=_REGISTRY).select(signals, 0).counts.tolist() == [0, 0]
    assert compose("relevance.none+critical+fps+budget.split+placement.withdraw(k=2)").select(signals, [0, 2]).counts.tolist() == [0, 2]
    with pytest.raises(BudgetError, match="placement.withdraw"):
        compose("fastv", registry=_REGISTRY).select(signals, 0)


def test_prune_and_the_setter_take_zero_for_vtw_only(tiny_model) -> None:
    from adapter_fixtures import record_hooks

    from vtprune.framework import prune

    before = record_hooks(tiny_model)
    with pytest.raises(BudgetError, match="placement.withdraw"):
        prune(tiny_model, "zspaprune", budget=0)
    assert record_hooks(tiny_model) == before
    with prune(tiny_model, "vtw", budget=0, k=1, registry=_REGISTRY) as handle:
        assert handle.budget == 0
        handle.budget = [0, 1.0]
        assert handle.budget == (0, 1.0)
        with pytest.raises(BudgetError, match="budget"):
            handle.budget = 0.0
        assert handle.budget == (0, 1.0)

