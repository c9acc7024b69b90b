"""Unique names: every registered name is spellable unambiguously; an ambiguous bare name is an error
that lists the qualified spellings; every recipe the project ships (YAML configs, README, docs)
still composes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from vtprune.framework import RecipeError, UnknownNameError, build_registry, compose
from vtprune.framework.names import is_shared, meanings, spellings
from vtprune.framework.stages import STAGE_KINDS
from vtprune.testing.stages import KIT_STAGES, kit_registry

ROOT = Path(__file__).resolve().parents[2]
_REGISTRY = build_registry(autoload=False)
SHARED = sorted(
    name
    for name in {n for table in _REGISTRY.stages.values() for n in table} | set(_REGISTRY.presets)
    if is_shared(name, _REGISTRY)
)

#: The built-ins plus the testing kit's stages (`vtprune.testing.kit_registry`), for doc recipes that name them.
_KIT_REGISTRY = kit_registry()
_KIT_NAMES = {cls.name for cls in KIT_STAGES}

#: Recipes the docs show as errors on purpose (each must raise RecipeError).
DOC_ERROR_EXAMPLES = {"zspaprune+divprune+fastv", "critical+dart"}
#: Names the docs define in a plugin example (not registered by vtprune itself).
DOC_PLUGIN_NAMES = {"token_norm", "your_preset", "norm_fps"}

_CALL = re.compile(r"""(?:compose|prune)\((?:[A-Za-z_]+,\s*)?["']([^"'<>]+)["']""")
_SPAN = re.compile(r"`\"?([A-Za-z_][A-Za-z0-9_.]*(?:\([^`]*?\))?(?:\+[A-Za-z_][A-Za-z0-9_.]*(?:\([^`]*?\))?)+)\"?`")


def _doc_recipes() -> list[tuple[str, str]]:
    """(file, recipe) for every compose/prune string literal and every inline `a+b` recipe span."""
    found = set()
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for pattern in (_CALL, _SPAN):
            found.update((path.name, match.group(1)) for match in pattern.finditer(text))
    return sorted(found)


def _yaml_recipes() -> list[tuple[str, str]]:
    """(file, recipe) for every ``recipe`` / ``method.recipe`` value in experiments/configs/*.yaml."""
    found = set()

    def walk(node, name: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if str(key).split(".")[-1] == "recipe":
                    for item in value if isinstance(value, list) else [value]:
                        found.add((name, str(item)))
                walk(value, name)
        elif isinstance(node, list):
            for item in node:
                walk(item, name)

    for path in sorted((ROOT / "experiments" / "configs").glob("*.yaml")):
        walk(yaml.safe_load(path.read_text()), path.name)
    return sorted(found)


def test_the_collectors_find_the_shipped_recipes() -> None:
    docs = {recipe for _, recipe in _doc_recipes()}
    configs = {recipe for _, recipe in _yaml_recipes()}
    assert {"zspaprune+kmeans", "critical+none", "fastv+critical", "zspaprune+diversity.divprune"} <= docs
    assert {"zspaprune+diversity.random", "fastv+layer(k=1)", "pdrop", "divprune", "random"} <= configs


@pytest.mark.parametrize("where, recipe", _doc_recipes() + _yaml_recipes())
def test_every_shipped_recipe_composes(where: str, recipe: str) -> None:
    if recipe in DOC_ERROR_EXAMPLES:
        with pytest.raises(RecipeError, match="write"):
            compose(recipe, registry=_REGISTRY)
        return
    if set(re.findall(r"[a-z_]+", recipe)) & DOC_PLUGIN_NAMES:
        pytest.skip("a plugin example defined in the docs")
    registry = _KIT_REGISTRY if set(re.findall(r"[a-z_]+", recipe)) & _KIT_NAMES else _REGISTRY  # the testing kit's stages
    pipeline = compose(recipe, registry=registry)
    assert compose(str(pipeline), registry=registry) == pipeline


def test_shared_names_are_the_ones_the_issue_lists() -> None:
    issue_12 = {"fastv", "pdrop", "visionzip", "dart", "vispruner", "random", "pooling", "divprune", "none"}
    video_methods = {"fastvid", "holitom", "prunevid"}  # issue 15: preset + its own diversity / budget stages, as the peers
    peers_added = {"prumerge"}  # LLaVA-PruMerge: preset + its own diversity / budget stages, as the peers
    graph_and_withdrawal = {"gprune", "withdraw"}  # G-Prune: preset + relevance + budget; VTW: budget + placement
    fitprune = {"fitprune"}  # preset + its relevance and placement stages
    flowcut = {"flowcut"}  # preset + its relevance stage (the in-tower rule at placement vision_layers)
    assert set(SHARED) == issue_12 | video_methods | peers_added | graph_and_withdrawal | fitprune | flowcut


@pytest.mark.parametrize("name", SHARED)
def test_every_meaning_of_a_shared_name_is_spellable(name: str) -> None:
    for spelling in meanings(name, _REGISTRY):
        kind, _, _ = spelling.partition(".")
        if kind == "preset":
            assert compose(spelling, registry=_REGISTRY) == compose(name, registry=_REGISTRY)
            assert compose(spelling, registry=_REGISTRY).preset == name
            continue
        assert _REGISTRY.stage(kind, name).name == name
        assert spelling in spellings(_REGISTRY)


@pytest.mark.parametrize("name", SHARED)
def test_canonical_recipes_qualify_shared_names(name: str) -> None:
    for kind in _REGISTRY.kinds_of(name):
        recipe = _recipe_with(kind, name)
        pipeline = compose(recipe, registry=_REGISTRY)
        assert getattr(pipeline, kind).name == name
        assert f"{kind}.{name}" in str(pipeline)
        assert compose(str(pipeline), registry=_REGISTRY) == pipeline


def _recipe_with(kind: str, name: str) -> str:
    """A valid recipe that uses stage ``kind.name`` (the rest: a preset that provides its signals)."""
    for preset in sorted(_REGISTRY.presets):
        try:
            compose(f"{preset}+{kind}.{name}", registry=_REGISTRY)
        except Exception:
            continue
        return f"{preset}+{kind}.{name}"
    raise AssertionError(f"no preset composes with {kind}.{name}")


def test_later_preset_name_is_an_error_that_explains() -> None:
    with pytest.raises(RecipeError) as info:
        compose("zspaprune+divprune+fastv", registry=_REGISTRY)
    message = str(info.value)
    assert "'divprune' is ambiguous" in message and "preset" in message and "diversity.divprune" in message
    assert info.value.position == len("zspaprune+")
    with pytest.raises(RecipeError, match="budget.fastv"):
        compose("zspaprune+diversity.divprune+fastv", registry=_REGISTRY)
    pipeline = compose("zspaprune+diversity.divprune+budget.fastv", registry=_REGISTRY)
    assert (pipeline.diversity.name, pipeline.budget.name, pipeline.preset) == ("divprune", "fastv", "zspaprune")


def test_bare_presets_first_keep_working() -> None:
    for preset in sorted(_REGISTRY.presets):
        assert compose(preset, registry=_REGISTRY).preset == preset
    assert compose("divprune", registry=_REGISTRY).diversity.name == "divprune"
    assert compose("fastv", registry=_REGISTRY).budget.name == "fastv"
    swapped = compose("zspaprune+kmeans", registry=_REGISTRY)
    assert swapped.diversity.name == "kmeans" and swapped.preset == "zspaprune"
    assert compose("critical+fps", registry=_REGISTRY) == compose("zspaprune", registry=_REGISTRY)
    random_vision = compose("random+critical+fps+vision", registry=_REGISTRY)
    assert random_vision.preset == "random" and random_vision.relevance.name == "none"


def test_preset_qualifier_must_be_first() -> None:
    with pytest.raises(RecipeError, match="can only be the first term"):
        compose("zspaprune+preset.fastv", registry=_REGISTRY)
    with pytest.raises(RecipeError, match="can only be the first term"):
        compose("critical+preset.fastv", registry=_REGISTRY)
    with pytest.raises(UnknownNameError, match="unknown preset 'fsatv'"):
        compose("preset.fsatv", registry=_REGISTRY)


@pytest.mark.parametrize(
    "recipe, spellings_listed",
    [
        ("none", ["relevance.none", "diversity.none"]),
        ("critical+dart", ["diversity.dart", "budget.dart"]),
        ("critical+visionzip", ["diversity.visionzip", "budget.visionzip"]),
        ("prompt_cosine+vispruner", ["diversity.vispruner", "budget.vispruner"]),
        ("random+random", ["relevance.random", "diversity.random"]),
    ],
)
def test_bare_name_of_several_kinds_that_position_does_not_decide(recipe: str, spellings_listed: list[str]) -> None:
    with pytest.raises(RecipeError) as info:
        compose(recipe, registry=_REGISTRY)
    for spelling in spellings_listed:
        assert spelling in str(info.value)


def test_position_decides_between_kinds() -> None:
    assert compose("critical+none", registry=_REGISTRY).diversity.name == "none"
    assert compose("none+fps", registry=_REGISTRY).relevance.name == "none"
    assert compose("none+critical+fps+vision", registry=_REGISTRY).relevance.name == "none"
    with pytest.raises(RecipeError, match="diversity.random"):  # random is a preset too: later, qualify it
        compose("prompt_cosine+critical+random", registry=_REGISTRY)
    assert compose("zspaprune+diversity.random", registry=_REGISTRY).diversity.name == "random"
    # the next term bounds the kind (a qualified one too): none before a diversity stage is relevance none
    assert compose("none+diversity.fps", registry=_REGISTRY).relevance.name == "none"
    assert compose("prompt_cosine+none+pre_llm", registry=_REGISTRY).diversity.name == "none"


def test_unknown_name_lists_each_spelling_once_with_the_nearest() -> None:
    with pytest.raises(UnknownNameError) as info:
        compose("critical+dartt", registry=_REGISTRY)
    message = str(info.value)
    listed = message.split("names: ", 1)[1].split(", ")
    assert len(listed) == len(set(listed))
    assert "dart, dart" not in message and "divprune, divprune" not in message
    assert {"budget.dart", "diversity.dart", "preset.dart", "fps", "zspaprune"} <= set(listed)
    assert "dart" not in listed  # a shared name only appears qualified
    assert "Did you mean 'dart' (diversity.dart, budget.dart, preset.dart)?" in message
    with pytest.raises(UnknownNameError) as info:
        compose("critical+qqqqqq", registry=_REGISTRY)
    assert "Did you mean" not in str(info.value)


def test_every_stage_kind_is_a_valid_qualifier_and_others_are_not() -> None:
    with pytest.raises(UnknownNameError, match="stage kind 'diversty'.*Did you mean 'diversity'"):
        compose("diversty.fps", registry=_REGISTRY)
    for kind in STAGE_KINDS:
        name = sorted(_REGISTRY.stages[kind])[0]
        assert _REGISTRY.stage(kind, name)
