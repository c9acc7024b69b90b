"""compose(): the grammar, presets, swaps, dict form, parameters, canonical round trip, errors."""

from __future__ import annotations

import pytest

from vtprune.framework import (
    BudgetError,
    ParameterError,
    RecipeError,
    UnknownNameError,
    VtpruneError,
    build_registry,
    compose,
)
from vtprune.framework.stages import STAGE_KINDS

_REGISTRY = build_registry(autoload=False)


def _every_stage_recipe() -> list[str]:
    out = []
    for kind in STAGE_KINDS:
        for name, item in sorted(_REGISTRY.stages[kind].items()):
            out.append(f"{kind}.{name}")
    return out


@pytest.mark.parametrize("preset", sorted(_REGISTRY.presets))
def test_round_trip_every_preset(preset: str) -> None:
    pipeline = compose(preset, registry=_REGISTRY)
    again = compose(str(pipeline), registry=_REGISTRY)
    assert again == pipeline and str(again) == str(pipeline)
    assert compose(pipeline.to_dict(), registry=_REGISTRY) == pipeline


@pytest.mark.parametrize("term", _every_stage_recipe())
def test_round_trip_every_stage(term: str) -> None:
    kind, name = term.split(".")
    cls = _REGISTRY.stage(kind, name)
    needed = set(cls.requires)
    placement = next(
        p for p, item in _REGISTRY.stages["placement"].items() if needed <= item.obj.provides | {"visual", "visual_mask"}
    ) if kind != "placement" else None
    recipe = term if placement is None else f"{term}+placement.{placement}"
    if placement is not None and kind != "relevance" and "prompt" not in _REGISTRY.stage("placement", placement).provides:
        recipe = f"relevance.none+{recipe}"  # a prompt-free placement (vision: diversity.prumerge's CLS signals)
    if kind == "relevance" and not cls.gives_scores:
        recipe += "+diversity.fps"
    if kind == "diversity" and not cls.adds_tokens:
        recipe = f"prompt_cosine+{recipe}"
    if kind == "placement":
        needs = _REGISTRY.stage("placement", name).provides
        if "prompt" not in needs:  # e.g. vision: prompt-free stages
            recipe = f"relevance.none+diversity.fps+{term}"
    pipeline = compose(recipe, registry=_REGISTRY)
    assert getattr(pipeline, kind).name == name
    assert compose(str(pipeline), registry=_REGISTRY) == pipeline


def test_defaults_are_zspaprune() -> None:
    assert compose("critical+fps") == compose("zspaprune")
    assert str(compose("zspaprune")) == "prompt_cosine(pool=mean)+critical+fps+split(critical=0.6)+pre_llm"


def test_preset_with_one_stage_swapped() -> None:
    pipeline = compose("zspaprune+kmeans")
    assert pipeline.diversity.name == "kmeans" and pipeline.relevance.name == "prompt_cosine"
    assert pipeline.preset == "zspaprune"


def test_parameters_in_recipe_kwargs_and_dict() -> None:
    a = compose("prompt_cosine(pool=max)+critical+kmeans(seed=3)+split(critical=0.5)")
    b = compose("zspaprune+kmeans", pool="max", seed=3, critical=0.5)
    c = compose({"preset": "zspaprune", "relevance": "prompt_cosine(pool=max)", "diversity": {"name": "kmeans", "seed": 3}, "budget": {"name": "split", "critical": 0.5}})
    assert a == b == c


def test_kind_qualified_kwargs() -> None:
    pipeline = compose("relevance.random+critical+diversity.random", diversity__seed=5, relevance__seed=7)
    assert pipeline.diversity.seed == 5 and pipeline.relevance.seed == 7
    with pytest.raises(ParameterError, match="ambiguous.*relevance__seed"):
        compose("relevance.random+critical+diversity.random", seed=1)


def test_ambiguous_names_resolve_by_position() -> None:
    assert compose("critical+none").diversity.name == "none"
    assert compose("none+fps").relevance.name == "none"
    assert "diversity.none" in str(compose("critical+none"))


def test_schedule_parameters() -> None:
    pipeline = compose("zspaprune+schedule(layers=[2, 8], ratio=0.5)")
    drops = pipeline.placement.drops(0.5)
    assert [(d.where, d.layer, d.budget) for d in drops] == [("layer", 2, 0.5), ("layer", 8, 0.5)]
    assert compose(str(pipeline)) == pipeline


def test_unknown_name_lists_choices_and_nearest() -> None:
    with pytest.raises(UnknownNameError) as info:
        compose("critical+fsp")
    message = str(info.value)
    assert "'fps'" in message and "kmeans" in message and "zspaprune" in message
    with pytest.raises(UnknownNameError, match="Did you mean 'zspaprune'"):
        compose("zspaprun")


def test_two_stages_of_one_kind() -> None:
    with pytest.raises(RecipeError, match="two diversity stages: 'fps' and 'kmeans'"):
        compose("critical+fps+kmeans")


def test_unknown_and_ill_typed_parameters() -> None:
    with pytest.raises(ParameterError, match="no parameter 'pol'.*pool"):
        compose("prompt_cosine(pol=max)")
    with pytest.raises(ParameterError, match="'mean' \\| 'max' \\| 'token_max'"):
        compose("prompt_cosine(pool=median)")
    with pytest.raises(ParameterError, match="must be int"):
        compose("kmeans(seed=1.5)")
    with pytest.raises(ParameterError, match="must be in"):
        compose("split(critical=1.5)")
    with pytest.raises(ParameterError, match="valid:"):
        compose("zspaprune", nonsense=1)


@pytest.mark.parametrize(
    "recipe, position",
    [("critical++fps", 9), ("fps(seed=)", 9), ("critical fps", 9), ("fps(seed=1", 10), ("3fps", 0)],
)
def test_malformed_recipe_points_at_position(recipe: str, position: int) -> None:
    with pytest.raises(RecipeError) as info:
        compose(recipe)
    assert info.value.position == position
    assert str(info.value).splitlines()[-1].index("^") == position + 2


def test_capability_error_at_compose_time() -> None:
    with pytest.raises(VtpruneError, match="needs signal 'attention'.*placements (.*, )?layer, schedule"):
        compose("attention+critical+fps+pre_llm")


def test_nothing_selects() -> None:
    with pytest.raises(VtpruneError, match="nothing would be selected"):
        compose("relevance.none+diversity.none")


@pytest.mark.parametrize("bad", [0, -3, 1.5, 0.0, "64", None, True, float("nan")])
def test_bad_budgets(bad) -> None:
    from vtprune.testing import make_signals

    with pytest.raises(BudgetError, match="budget"):
        compose("zspaprune").select(make_signals([6]), bad)


def test_pipeline_optional_lists_the_signals_its_stages_use_when_present() -> None:
    """``Pipeline.optional``: fields a stage reads if an adapter gives them (video layout), never the required ones."""
    assert {"frames", "frame_index"} <= compose("holitom").optional
    assert not compose("holitom").optional & compose("holitom").requires
    assert compose("zspaprune").optional == frozenset()
