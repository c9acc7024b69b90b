"""vtprune.testing: factories reproduce the historical signals, the contract checks pass on every registered stage
(test_selection_properties.py runs them over the registry) and FAIL with a precise message on deliberately
broken stages, pipelines and adapters, and check_adapter passes on tiny LLaVA, LLaVA-NeXT and Qwen2-VL models."""

from __future__ import annotations

import dataclasses
import re
import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from vtprune.framework import (
    Allocation,
    BudgetAllocator,
    CriticalSelector,
    DiversitySupplementer,
    Drop,
    LayerPlacement,
    RelevanceScorer,
    Signals,
    Supplement,
    build_registry,
    compose,
    hookimpl,
    selection_from_masks,
)
from vtprune.testing import (
    ContractError,
    StageCase,
    adaptive_counts,
    check_adapter,
    check_case,
    check_pipeline,
    check_placement,
    check_selection,
    check_stage,
    clustered_signals,
    grid_for,
    make_signals,
    pad_signals,
    ragged_signals,
    registry_cases,
    signals_for,
    trim_row,
)
from vtprune.testing import models, tiny_llava
from vtprune.testing.adapters import AdapterContractError, record_hooks

pytestmark = pytest.mark.filterwarnings("ignore:Number of distinct clusters")  # k-means on clustered signals

PLUGIN_FILE = Path(__file__).resolve().parents[1] / "plugin_package" / "vtprune_example_plugin.py"
REGISTRY = build_registry(autoload=False)
FAST = dict(shapes=((9, 6), (12, 12)), seeds=(0,), budgets=(3, 0.5))


def _example_plugin():
    """The example plugin module, imported from its file (not installed)."""
    if "vtprune_example_plugin" not in sys.modules:
        spec = importlib.util.spec_from_file_location("vtprune_example_plugin", PLUGIN_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules["vtprune_example_plugin"]


# ---------------------------------------------------------------------------------------------------------------
# Signal factories
# ---------------------------------------------------------------------------------------------------------------


def _historical_make_signals(lengths, dim=8, prompt_len=5, seed=0, heads=2, grid=None) -> Signals:
    """tests/conftest.make_signals as it was before the kit (the reference for bit-identity)."""
    generator = torch.Generator().manual_seed(seed)
    batch, tokens = len(lengths), max(lengths)
    visual = torch.randn(batch, tokens, dim, generator=generator)
    valid = torch.arange(tokens).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    attention = torch.softmax(torch.randn(batch, heads, tokens, generator=generator), dim=-1)
    return Signals(
        visual=visual,
        visual_mask=valid,
        prompt=torch.randn(batch, prompt_len, dim, generator=generator),
        prompt_mask=torch.ones(batch, prompt_len, dtype=torch.bool),
        attention=attention,
        visual_keys=torch.randn(batch, tokens, heads, 4, generator=generator),
        prompt_keys=torch.randn(batch, prompt_len, heads, 4, generator=generator),
        clip_visual=torch.randn(batch, tokens, 6, generator=generator),
        clip_text=torch.randn(batch, 3, 6, generator=generator),
        clip_text_mask=torch.ones(batch, 3, dtype=torch.bool),
        cls_attention=torch.softmax(torch.randn(batch, heads, tokens, generator=generator), dim=-1),
        grid=grid,
    )


@pytest.mark.parametrize("args", [dict(lengths=[9, 6]), dict(lengths=[16], seed=3, grid=(4, 4)), dict(lengths=[3, 8, 5], dim=12, heads=3, seed=7)])
def test_make_signals_is_bit_identical_to_the_historical_factory(args):
    ours, theirs = make_signals(**args), _historical_make_signals(**args)
    for field in dataclasses.fields(Signals):
        if field.name in ("prompt_attention", "visual_attention"):  # added later, drawn after the historical fields
            assert getattr(ours, field.name) is not None and getattr(theirs, field.name) is None
            continue
        a, b = getattr(ours, field.name), getattr(theirs, field.name)
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), field.name


def test_no_test_imports_helpers_from_conftest():
    """Fixtures come through conftest; helper functions from the kit or tests/helpers, never ``from conftest``."""
    tests = Path(__file__).resolve().parents[1]
    offenders = [
        str(path.relative_to(tests))
        for path in tests.rglob("*.py")
        if "build" not in path.parts and re.search(r"^\s*(from conftest import|import conftest)", path.read_text(), re.M)
    ]
    assert offenders == []


def test_ragged_signals_give_each_row_its_grid():
    signals = ragged_signals([9, 6, 7], seed=1)
    assert signals.grid is None and signals.grids.tolist() == [[3, 3], [2, 3], [1, 7]]
    assert signals.row_grids() == [(3, 3), (2, 3), (1, 7)]
    same = ragged_signals([12, 12])
    assert same.grid == (3, 4) and same.grids is None
    assert grid_for(0) is None and grid_for(13) == (1, 13)


def test_clustered_signals_have_exact_duplicates_and_valid_attention():
    signals = clustered_signals([10, 7], clusters=2, seed=4)
    for row, length in enumerate([10, 7]):
        real = signals.visual[row, :length]
        assert torch.unique(real, dim=0).shape[0] <= 2
    torch.testing.assert_close(signals.attention.sum(-1), torch.ones(2, 2))
    with pytest.raises(ValueError, match="clusters must be >= 1"):
        clustered_signals([3], clusters=0)


def test_signals_for_fills_only_what_is_required():
    pipeline = compose("zspaprune")
    signals = signals_for(pipeline, [5, 3])
    assert signals.present() == {"visual", "visual_mask", "prompt", "prompt_mask", "grids"}
    assert signals_for({"clip_text"}, [4]).present() >= {"clip_text", "clip_text_mask"}
    with pytest.raises(ValueError, match="unknown Signals fields \\['promt'\\]; valid: visual"):
        signals_for({"promt"}, [4])


def test_trim_and_pad_keep_the_real_tokens():
    signals = ragged_signals([9, 6], seed=2)
    cut = trim_row(signals, 1, 6)
    assert cut.num_tokens == 6 and cut.visual_mask is None and cut.grid == (2, 3)
    assert torch.equal(cut.visual[0], signals.visual[1, :6]) and torch.equal(cut.attention[0], signals.attention[1, :, :6])
    padded = pad_signals(signals, 4)
    assert padded.num_tokens == 13 and torch.equal(padded.valid(), torch.cat([signals.valid(), torch.zeros(2, 4, dtype=torch.bool)], 1))
    assert torch.equal(padded.visual[:, :9], signals.visual) and padded.visual[:, 9:].abs().max() > 10


@pytest.mark.slow  # a fresh interpreter in a subprocess
def test_kit_imports_without_hypothesis_and_says_how_to_get_it():
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import vtprune.testing, vtprune.testing.properties as p\n"
        "assert 'pytest' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)\n"
        "try:\n    p.contract_inputs()\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'vtprune[test]'" in out.stdout and "check_pipeline" in out.stdout


# ---------------------------------------------------------------------------------------------------------------
# registry_cases and the example plugin
# ---------------------------------------------------------------------------------------------------------------


def test_registry_cases_cover_every_stage_and_preset_with_kind_name_ids():
    params = registry_cases(REGISTRY)
    ids = [p.id for p in params]
    expected = [f"preset.{n}" for n in sorted(REGISTRY.presets)]
    for kind, table in REGISTRY.stages.items():
        expected += [f"{kind}.{n}" for n in sorted(table)]
    assert sorted(ids) == sorted(expected) and len(set(ids)) == len(ids)
    assert all(isinstance(p.values[0], StageCase) for p in params)
    assert [p.id for p in registry_cases(REGISTRY, kinds=("critical",))] == ["critical.critical", "critical.topk_official"]
    with pytest.raises(ValueError, match="unknown case kinds \\['stage'\\]; valid: preset, relevance"):
        registry_cases(REGISTRY, kinds=("stage",))


def test_registry_cases_include_plugins():
    registry = build_registry(autoload=False, plugins=[_example_plugin()])
    ids = [p.id for p in registry_cases(registry)]
    assert "relevance.token_norm" in ids and "preset.norm_fps" in ids


def test_the_example_plugin_meets_the_contract():
    registry = build_registry(autoload=False, plugins=[_example_plugin()])
    check_case(StageCase("relevance", "token_norm"), registry=registry, **FAST)
    check_case(StageCase("preset", "norm_fps"), registry=registry, **FAST)


# ---------------------------------------------------------------------------------------------------------------
# Broken stages fail with the right message
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PicksPadding(CriticalSelector):
    """Top-k over every position, padding included."""

    name: ClassVar[str] = "picks_padding"
    description: ClassVar[str] = "broken: ignores valid"

    def select(self, scores, counts, valid):
        raw = torch.where(valid, scores, torch.full_like(scores, 1e9))  # padding scores highest
        rank = raw.argsort(dim=1, descending=True).argsort(dim=1)
        return rank < counts.unsqueeze(1)


@dataclass(frozen=True, eq=False)
class OneTooMany(CriticalSelector):
    """Top-(k+1): one token more than asked."""

    name: ClassVar[str] = "one_too_many"
    description: ClassVar[str] = "broken: wrong count"

    def select(self, scores, counts, valid):
        rank = scores.masked_fill(~valid, float("-inf")).argsort(dim=1, descending=True).argsort(dim=1)
        return (rank < (counts + 1).unsqueeze(1)) & valid


@dataclass(frozen=True, eq=False)
class BottomK(CriticalSelector):
    """The lowest-scoring tokens."""

    name: ClassVar[str] = "bottom_k"
    description: ClassVar[str] = "broken: not top-k"

    def select(self, scores, counts, valid):
        rank = scores.masked_fill(~valid, float("inf")).argsort(dim=1).argsort(dim=1)
        return (rank < counts.unsqueeze(1)) & valid


@dataclass(frozen=True, eq=False)
class BatchCoupled(RelevanceScorer):
    """Similarity to the batch-wide mean token: a row's scores depend on the other rows."""

    name: ClassVar[str] = "batch_coupled"
    description: ClassVar[str] = "broken: couples rows"

    def score(self, signals):
        centre = signals.visual.mean(dim=(0, 1))  # (D,) over the whole batch
        return (signals.visual * centre).sum(-1)  # (B, N)


@dataclass(frozen=True, eq=False)
class WidthDependent(RelevanceScorer):
    """Prefers the middle of the padded width: a row's picks depend on the padding."""

    name: ClassVar[str] = "width_dependent"
    description: ClassVar[str] = "broken: reads the padded width"

    def score(self, signals):
        positions = torch.arange(signals.num_tokens, dtype=torch.float32)
        return -(positions - signals.num_tokens / 2).abs().expand(signals.batch_size, -1)  # (B, N)


@dataclass(frozen=True, eq=False)
class UndeclaredPrompt(RelevanceScorer):
    """Reads ``prompt`` without declaring it."""

    name: ClassVar[str] = "undeclared_prompt"
    description: ClassVar[str] = "broken: reads an undeclared signal"

    def score(self, signals):
        return (signals.visual * signals.prompt.mean(1, keepdim=True)).sum(-1)  # (B, N)


@dataclass(frozen=True, eq=False)
class Backwards(LayerPlacement):
    """Drops at layer 4 then layer 2."""

    name: ClassVar[str] = "backwards"
    description: ClassVar[str] = "broken: drops out of model order"

    def drops(self, budget):
        return (Drop("layer", 4, budget), Drop("layer", 2, 0.5))


class BrokenStages:
    @hookimpl
    def vtprune_register_stages(self, registry):
        for cls in (PicksPadding, OneTooMany, BottomK, BatchCoupled, WidthDependent, UndeclaredPrompt, Backwards):
            registry.add_stage(cls)


BROKEN = build_registry(autoload=False, plugins=[BrokenStages()])


@pytest.mark.parametrize(
    "kind,name,message",
    [
        ("critical", "picks_padding", r"\[critical.picks_padding: prompt_cosine\+critical.picks_padding\+diversity.none\] "
         r"property 'padding never chosen' fails at budget=3, row 1 \(lengths \[9, 6\], seed 0, ragged_signals\): critical stage 'picks_padding' picked padding \[6, 7, 8\]"),
        ("critical", "one_too_many", r"property 'exact count' fails at budget=3, row 0 .*critical stage 'one_too_many' picked 4 tokens, asked for 3"),
        ("critical", "bottom_k", r"property 'critical top scores' fails at budget=3, row 0 .*pass top_scores=False"),
        ("relevance", "batch_coupled", r"\[relevance.batch_coupled: relevance.batch_coupled\+critical\+fps\] property 'batch == per-sample' fails at budget=3, row \d"),
        ("relevance", "width_dependent", r"property 'padding invariance' fails at budget=3, row 1 .*cut to its 6 real tokens"),
        ("relevance", "undeclared_prompt", r"property 'requires declared' fails at budget=3 .*signals_for\(\[.*\]\)\): select failed .*NoneType"),
        ("placement", "backwards", r"\[placement.backwards: .*\] property 'placement drops' fails at budget=3 .*not in model order"),
    ],
)
def test_broken_stages_fail_with_the_property_row_and_budget(kind, name, message):
    with pytest.raises(ContractError, match=message):
        check_stage(kind, name, registry=BROKEN, **FAST)


def test_bottom_k_passes_when_top_scores_is_not_required():
    check_stage("critical", "bottom_k", registry=BROKEN, top_scores=False, **FAST)


def test_a_stage_class_is_checked_without_registering_it():
    with pytest.raises(ContractError, match=r"\[relevance.batch_coupled: .*\] property 'batch == per-sample'"):
        check_stage(BatchCoupled, registry=REGISTRY, **FAST)
    with pytest.raises(TypeError, match="check_stage takes a stage class, or a kind and a name"):
        check_stage("relevance")


class _Wrapper:
    """A duck-typed pipeline around a composed one; ``fix(selection, signals)`` breaks its output."""

    def __init__(self, recipe, fix):
        self.pipeline, self.fix = compose(recipe), fix

    def __getattr__(self, name):
        return getattr(self.pipeline, name)

    def __str__(self):
        return f"broken({self.pipeline})"

    def select(self, signals, budget):
        return self.fix(self.pipeline.select(signals, budget), signals)


def _reversed(selection, signals):
    return dataclasses.replace(selection, indices=torch.where(selection.mask, selection.indices.flip(1), 0))


def _critical_on_padding(selection, signals):
    critical = selection.critical.clone()
    critical[:, -1] = True
    return dataclasses.replace(selection, critical=critical)


def _wide_values(selection, signals):
    return dataclasses.replace(selection, values=torch.zeros(*selection.indices.shape, signals.visual.shape[-1] + 1))


def _drops_last(selection, signals):
    keep = selection.kept_mask(signals.num_tokens)
    last = keep.long().cumsum(1).argmax(dim=1)  # (B,) position of each row's last kept token
    keep[torch.arange(keep.shape[0]), last] = False
    return selection_from_masks(keep, selection.critical.new_zeros(keep.shape) & keep)


class _Forgetful:
    """Different picks when it is given the very same Signals object again (not deterministic)."""

    def __init__(self):
        self.seen = []  # the objects themselves (an id could be reused once an object is freed)

    def __call__(self, selection, signals):
        if not any(seen is signals for seen in self.seen):
            self.seen.append(signals)
            return selection
        keep = torch.zeros_like(signals.valid())
        for row, count in enumerate(selection.counts.tolist()):
            keep[row, signals.valid()[row].nonzero().flatten()[-count:] if count else []] = True
        return selection_from_masks(keep, torch.zeros_like(keep))


@pytest.mark.parametrize(
    "fix,lengths,budget,message",
    [
        (_reversed, [9, 6], 4, r"\[broken\(.*\)\] property 'ascending unique' fails at budget=4, row 0 \(lengths \[9, 6\]\): kept indices \[\d+, .*\] are not strictly increasing"),
        (_critical_on_padding, [9, 6], 8, r"property 'critical on kept only' fails at budget=8, row 1"),
        (_wide_values, [9, 6], 4, r"property 'values shape' fails at budget=4 .*values must be \(2, 4, 8\) floating point"),
        (_drops_last, [9, 6], 4, r"property 'exact count' fails at budget=4, row 0 \(lengths \[9, 6\]\): kept 3 tokens, the budget resolves to 4 \(row has 9 real tokens\)"),
        (_Forgetful(), [9, 6], 4, r"property 'determinism' fails at budget=4, row 0 .*a second call kept"),
    ],
)
def test_broken_pipelines_fail_with_the_property_row_and_budget(fix, lengths, budget, message):
    pipeline = _Wrapper("zspaprune", fix)
    with pytest.raises(ContractError, match=message):
        check_selection(pipeline, ragged_signals(lengths), budget)


# ---------------------------------------------------------------------------------------------------------------
# The relaxed contract of adaptive counts: run, not skipped, and still failing broken stages
# ---------------------------------------------------------------------------------------------------------------


def _first_free(valid, selected, counts):
    """(B, N) bool: the first ``counts[b]`` free real tokens of each row."""
    free = valid & ~selected
    return free & (free.long().cumsum(1) <= counts.unsqueeze(1))


@dataclass(frozen=True, eq=False)
class KeepsTooMany(DiversitySupplementer):
    """Keeps its own count (``exact_counts = False``): every free token, more than asked."""

    name: ClassVar[str] = "keeps_too_many"
    description: ClassVar[str] = "broken: own count above the budget"
    exact_counts: ClassVar[bool] = False

    def supplement(self, signals, selected, counts, valid, scores):
        return Supplement(valid & ~selected)


@dataclass(frozen=True, eq=False)
class BatchSizedCount(DiversitySupplementer):
    """Keeps its own count (``exact_counts = False``): one token fewer per other row of the batch."""

    name: ClassVar[str] = "batch_sized_count"
    description: ClassVar[str] = "broken: own count depends on the batch"
    exact_counts: ClassVar[bool] = False

    def supplement(self, signals, selected, counts, valid, scores):
        return Supplement(_first_free(valid, selected, (counts - (counts.shape[0] - 1)).clamp(min=0)))


@dataclass(frozen=True, eq=False)
class BatchMeanAdaptive(BudgetAllocator):
    """An adaptive allocator keeping half of the batch's mean total in every row."""

    name: ClassVar[str] = "batch_mean_adaptive"
    description: ClassVar[str] = "broken: adaptive count couples rows"
    adaptive_counts: ClassVar[bool] = True

    def adapt(self, signals, budget, totals, valid, scores):
        total = (totals.float().mean() / 2).ceil().long().expand_as(totals)  # (B,)
        return Allocation(total=total, critical=torch.zeros_like(totals))

    def allocate(self, totals, valid, scores):
        return Allocation(total=totals, critical=torch.zeros_like(totals))


@dataclass(frozen=True, eq=False)
class HalfAdaptive(BudgetAllocator):
    """A correct adaptive allocator: half of each row's total, a quarter of it critical."""

    name: ClassVar[str] = "half_adaptive"
    description: ClassVar[str] = "adaptive: half the total"
    adaptive_counts: ClassVar[bool] = True

    def adapt(self, signals, budget, totals, valid, scores):
        return Allocation(total=(totals + 1) // 2, critical=(totals + 3) // 4)

    def allocate(self, totals, valid, scores):
        return Allocation(total=totals, critical=totals // 2)


class AdaptiveStages:
    @hookimpl
    def vtprune_register_stages(self, registry):
        for cls in (KeepsTooMany, BatchSizedCount, BatchMeanAdaptive, HalfAdaptive):
            registry.add_stage(cls)


ADAPTIVE = build_registry(autoload=False, plugins=[AdaptiveStages()])


def test_registry_cases_skip_no_adaptive_case():
    """Adaptive allocators and ``exact_counts = False`` stages are cases like every other (the relaxed contract)."""
    params = registry_cases(REGISTRY)
    assert all(not p.marks for p in params)
    ids = {p.id for p in params}
    assert {"preset.sparsevlm", "preset.prunevid", "budget.mustdrop_split", "diversity.recycle"} <= ids
    for recipe in ("sparsevlm", "prompt_cosine+critical+diversity.recycle", "fastvid"):
        assert adaptive_counts(compose(recipe, registry=REGISTRY))
    assert not adaptive_counts(compose("zspaprune", registry=REGISTRY))


def test_a_correct_adaptive_allocator_passes_the_relaxed_contract():
    check_stage("budget", "half_adaptive", registry=ADAPTIVE, **FAST)
    selection = check_selection(compose("prompt_cosine+critical+fps+half_adaptive", registry=ADAPTIVE), ragged_signals([9, 6]), 4)
    assert selection.counts.tolist() == [2, 2] and selection.critical.sum(1).tolist() == [1, 1]


@pytest.mark.parametrize(
    "kind,name,message",
    [
        ("diversity", "keeps_too_many", r"\[diversity.keeps_too_many: prompt_cosine\+critical\+diversity.keeps_too_many\] property "
         r"'exact count' fails at budget=3, row 0 \(lengths \[9, 6\], seed 0, ragged_signals\): diversity stage 'keeps_too_many' "
         r"picked 7 tokens, asked for at most 1"),
        ("diversity", "batch_sized_count", r"property 'batch == per-sample' fails at budget=3, row 0 .*alone the row kept"),
        ("budget", "batch_mean_adaptive", r"property 'batch == per-sample' fails at budget=0.5, row 0 .*alone the row kept \[2, 3, 6\] instead of \[3, 6\]"),
    ],
)
def test_broken_adaptive_stages_fail_the_relaxed_contract(kind, name, message):
    with pytest.raises(ContractError, match=message):
        check_stage(kind, name, registry=ADAPTIVE, **FAST)


def _changes_values(selection, signals):
    return dataclasses.replace(selection, values=selection.gather(signals.visual) + 1.0)


def _drops_first(selection, signals):
    keep = selection.kept_mask(signals.num_tokens)
    keep[:, 0] = False
    return selection_from_masks(keep, selection.critical.new_zeros(keep.shape) & keep)


@pytest.mark.parametrize(
    "fix,budget,message",
    [
        (_changes_values, 100, r"property 'keep-all' fails at budget=100, row 0 .*kept token values were changed"),
        (_drops_first, [3, 6], r"property 'keep-all' fails at budget=\[3, 6\], row 1 .*the budget covers the row's 6 real tokens, but \[0\] are dropped"),
        (_drops_first, 4, r"property 'critical count' fails at budget=4, row 0"),
    ],
)
def test_broken_adaptive_pipelines_fail_keep_all_per_row(fix, budget, message):
    pipeline = _Wrapper("prompt_cosine+critical+diversity.recycle", fix)  # exact_counts = False: relaxed counts
    with pytest.raises(ContractError, match=message):
        check_selection(pipeline, ragged_signals([9, 6]), budget)


def test_contract_error_is_an_assertion_error_and_a_good_pipeline_passes():
    assert issubclass(ContractError, AssertionError)
    per_row = check_selection(compose("zspaprune"), ragged_signals([9, 6]), [3, 0.5])  # one budget per row
    assert per_row.counts.tolist() == [3, 3]
    check_pipeline("zspaprune", registry=REGISTRY, **FAST)
    check_pipeline(compose("critical+kmeans"), **FAST)
    check_placement(compose("pdrop").placement)


# ---------------------------------------------------------------------------------------------------------------
# check_adapter on tiny models, and on broken adapters / pipelines
# ---------------------------------------------------------------------------------------------------------------

_single_thread = pytest.fixture(scope="module", autouse=True)(lambda: (yield torch.set_num_threads(1)))

FAMILIES = {
    "llava": (models.tiny_llava, models.llava_batch),
    "llava_next": (models.tiny_llava_next, models.llava_next_batch),
    "qwen2_vl": (models.tiny_qwen2_vl, models.qwen2_vl_batch),
}
RECIPES = {
    "pre_llm": ("prompt_cosine+critical+fps+split(critical=0.6)+pre_llm", None),
    "layer": ("attention+critical+fps+layer(k=2)", None),
    "schedule": (
        "attention+critical+fps+schedule(layers=[1,2],ratio=0.5)",
        "attention+critical+fps+schedule(layers=[1,2],ratio=1.0)",
    ),
}


@pytest.mark.parametrize("placement", list(RECIPES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_check_adapter_passes_on_tiny_models(family, placement):
    model_factory, inputs_factory = FAMILIES[family]
    recipe, keep_all = RECIPES[placement]
    check_adapter(model_factory, inputs_factory, recipe, budgets=(3, 0.5), keep_all_recipe=keep_all)


class _PipelineWrapper:
    """A duck-typed pipeline for ``prune`` whose ``fix(selection, signals)`` breaks the selection."""

    def __init__(self, fix, recipe="prompt_cosine+critical+fps+split(critical=0.6)+pre_llm"):
        self.pipeline, self.fix = compose(recipe), fix

    def __getattr__(self, name):
        return getattr(self.pipeline, name)

    def select(self, signals, budget):
        return self.fix(self.pipeline.select(signals, budget), signals)


def _own_values(scale):
    def fix(selection, signals):
        return dataclasses.replace(selection, values=selection.gather(signals.visual) * scale)

    return fix


def _batch_dependent(selection, signals):
    if signals.batch_size == 1:
        return selection
    valid = signals.valid()
    keep = torch.zeros_like(valid)
    for row, count in enumerate(selection.counts.tolist()):
        keep[row, valid[row].nonzero().flatten()[-count:]] = True  # the last tokens instead of the pipeline's
    return selection_from_masks(keep, torch.zeros_like(keep))


def _one_more(selection, signals):
    keep = selection.kept_mask(signals.num_tokens)
    spare = signals.valid() & ~keep
    first = spare.float().argmax(dim=1)  # (B,) first unkept real token
    keep[torch.arange(keep.shape[0]), first] |= spare.any(1)
    return selection_from_masks(keep, torch.zeros_like(keep))


def test_tiny_model_factories_are_exported():
    assert tiny_llava is models.tiny_llava


def test_own_values_pass_so_values_reach_the_model():
    check_adapter(models.tiny_llava, models.llava_batch, _PipelineWrapper(_own_values(1.0)), budgets=(3,))


@pytest.mark.parametrize(
    "fix,message",
    [
        (_own_values(1.5), r"property 'masked reference' fails at budget=3, row 0: logits at kept slots differ from the unpruned model with the dropped tokens masked out by [\d.e+-]+ > atol 1e-05"),
        (_batch_dependent, r"property 'batch == alone' fails at budget=3, row 0: logits differ from the sample alone"),
        (_one_more, r"property 'counts' fails at budget=3: images kept \[4, 4, 4\] tokens, the budget resolves to \[3, 3, 3\]"),
    ],
)
def test_check_adapter_fails_on_broken_pipelines(fix, message):
    with pytest.raises(AdapterContractError, match=message):
        check_adapter(models.tiny_llava, models.llava_batch, _PipelineWrapper(fix), budgets=(3,))


def _wrapped_llava(name, wrap):
    """(model factory, registry) for a LLaVA subclass served by the built-in adapter description whose runtime's
    attachment goes through ``wrap(model, attachment) -> attachment``: a deliberately broken adapter, registered
    like a plugin's."""
    from transformers import LlavaForConditionalGeneration

    from vtprune.framework.prune import adapter_for

    broken_class = type(f"{name.title().replace('_', '')}Llava", (LlavaForConditionalGeneration,), {})
    base = adapter_for(models.tiny_llava())

    def make():
        template = models.tiny_llava()
        model = broken_class(template.config).eval()
        model.load_state_dict(template.state_dict())
        return model

    class BrokenAdapter(base):
        """The built-in adapter (a description) whose runtime's attachment is wrapped."""

        model_classes = (broken_class.__name__,)

        @staticmethod
        def runtime(description, pipeline, budget, **kwargs):
            return wrap(description.model, base.runtime(description, pipeline, budget, **kwargs))

    BrokenAdapter.name = name

    class Plugin:
        @hookimpl
        def vtprune_register_adapters(self, registry):
            registry.add_adapter(BrokenAdapter)

    return make, build_registry(autoload=False, plugins=[Plugin()])


def test_check_adapter_fails_on_an_adapter_that_leaves_a_hook():
    def leak(model, attachment):
        model.lm_head.register_forward_hook(lambda module, args, output: None)  # never removed
        return attachment

    make, registry = _wrapped_llava("leaky", leak)
    with pytest.raises(AdapterContractError, match=r"\[LeakyLlava .*\] property 'clean removal' fails .*hooks left on the model"):
        check_adapter(make, models.llava_batch, registry=registry, budgets=(3,))


class _Misreporting:
    """An attachment whose ``last_result`` reports the first tokens of every image as kept, not the ones it kept."""

    def __init__(self, inner):
        object.__setattr__(self, "inner", inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        setattr(self.inner, name, value)

    @property
    def last_result(self):
        result = self.inner.last_result
        if result is None or not result.drops:
            return result
        record = result.drops[0]
        mask = record.selection.mask
        first = torch.arange(mask.shape[1]).expand_as(mask)  # (R, K) positions 0..K-1
        reported = dataclasses.replace(record.selection, indices=torch.where(mask, first, 0))
        return dataclasses.replace(result, drops=(dataclasses.replace(record, selection=reported), *result.drops[1:]))


@pytest.mark.parametrize("placement", ["pre_llm", "layer"])
def test_check_adapter_fails_when_the_reported_selection_is_not_what_was_dropped(placement):
    make, registry = _wrapped_llava("misreporting", lambda model, attachment: _Misreporting(attachment))
    with pytest.raises(AdapterContractError, match=r"property 'masked reference' fails at budget=3, row 0: logits at kept slots differ"):
        check_adapter(make, models.llava_batch, RECIPES[placement][0], registry=registry, budgets=(3,))


def test_the_kit_norm_order_stage_meets_the_contract_and_orders_without_values():
    """``diversity.norm_order`` (only in `kit_registry`): the contract, and a selection whose ``order`` ranks each row's
    kept tokens by descending norm (a permutation of 0..k-1) with no merged values."""
    from vtprune.testing import NormOrder, kit_registry

    registry = kit_registry()
    assert "norm_order" not in REGISTRY.stages["diversity"] and registry.stage("diversity", "norm_order") is NormOrder
    check_stage("diversity", "norm_order", registry=registry, **FAST)
    pipeline = compose("relevance.none+critical+norm_order+split(critical=0.0)+pre_llm", registry=registry)
    signals = make_signals((20, 14, 17), seed=4)  # ragged rows
    selection = pipeline.select(signals, 5)
    assert selection.values is None and selection.order is not None
    norms = signals.visual.float().norm(dim=-1).masked_fill(~signals.visual_mask, -1.0)  # (B, N), padding last
    for b in range(3):
        want = norms[b].topk(5).indices  # (5,) descending norm
        kept = selection.row_indices(b)
        emitted = kept[selection.order[b][selection.mask[b]].argsort()]
        assert emitted.tolist() == want.tolist()
