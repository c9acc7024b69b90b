"""`compose`: recipe (string, dict or `Pipeline`) -> validated `Pipeline`.

Rules (docs/architecture.md has the long form):

- A recipe names at most one preset and at most one stage of each kind. A preset supplies the
  stages it names; explicitly named stages replace the preset's stage of the same kind (keeping
  the preset's parameters when the same stage is named again with more parameters); every other
  kind takes the framework default (:data:`DEFAULT_RECIPE`, the ZSPAPrune composition).
- A bare name is a preset when it is the first term and a preset of that name exists; otherwise
  the stage kind that has that name. A name several kinds share resolves to the first such kind
  that comes after the previous term's kind in canonical order (so ``critical+none`` means
  diversity ``none``); write ``kind.name`` to be explicit. Canonical recipes always qualify
  such names.
- ``**params`` set stage parameters: ``name=value`` goes to the one stage that has a parameter
  of that name; ``kind__name=value`` targets one kind.
- Everything is checked before any tensor is touched; errors list the valid choices.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from .errors import ParameterError, RecipeError, UnknownNameError, VtpruneError
from .params import bind_params
from .pipeline import ALWAYS_PRESENT, Pipeline
from .recipe import Term, parse_recipe
from .registry import Registry, default_registry
from .stages import STAGE_KINDS, Stage, stage_params

__all__ = ["compose", "DEFAULT_RECIPE", "Recipe"]

#: The stage of each kind that a recipe does not name (the ZSPAPrune composition).
DEFAULT_RECIPE = "prompt_cosine(pool=mean)+critical+fps+split(critical=0.6)+pre_llm"

Recipe = Union[str, Mapping[str, Any], Pipeline]
_DICT_KEYS = ("preset", *STAGE_KINDS, "params")


def compose(recipe: Recipe, registry: Optional[Registry] = None, **params: Any) -> Pipeline:
    """Build a validated `Pipeline`.

    Args:
        recipe: ``"critical+fps"``, ``"zspaprune"``, ``"zspaprune+kmeans"``,
            ``"prompt_cosine(pool=max)+critical+kmeans+split(critical=0.5)"``; a dict
            ``{"preset": ..., "<kind>": "name(params)" | {"name": ..., **params}, "params": {...}}``;
            or a `Pipeline` (``params`` then override its stages' parameters).
        registry: the registry to resolve names in (default: the installed plugins).
        **params: stage parameters, ``name=value`` or ``kind__name=value``.

    >>> str(compose("zspaprune+kmeans"))
    'prompt_cosine(pool=mean)+critical+kmeans(seed=0,n_init=1,max_iter=100)+split(critical=0.6)+pre_llm'
    """
    registry = default_registry(registry)
    if isinstance(recipe, Pipeline):
        chosen = {stage.kind: (stage.name, dict(stage.params)) for stage in recipe.stages}
        preset_name = recipe.preset
    else:
        terms, extra = _terms(recipe)
        params = {**extra, **params}
        preset_name, chosen = _resolve(terms, registry, recipe if isinstance(recipe, str) else str(recipe))
    _route_params(chosen, params, registry)
    stages = {}
    for kind in STAGE_KINDS:
        name, given = chosen[kind]
        cls = registry.stage(kind, name)
        bound = bind_params(cls, given, f"{kind} stage {name!r}")
        try:
            stages[kind] = cls(**bound)
        except (ValueError, TypeError) as error:
            raise ParameterError(f"{kind} stage {name!r}: {error}") from None
    qualified = frozenset(
        stage.name for stage in stages.values() if len(registry.kinds_of(stage.name)) > 1 or stage.name in registry.presets
    )
    pipeline = Pipeline(preset=preset_name, qualified=qualified, **stages)
    _check_pipeline(pipeline, registry)
    return pipeline


# -- recipe forms ----------------------------------------------------------------------------------


def _terms(recipe: Union[str, Mapping[str, Any]]) -> tuple[list[Term], dict[str, Any]]:
    if isinstance(recipe, str):
        return parse_recipe(recipe), {}
    if not isinstance(recipe, Mapping):
        raise TypeError(f"a recipe is a string, a dict or a Pipeline, got {type(recipe).__name__}")
    unknown = sorted(set(recipe) - set(_DICT_KEYS))
    if unknown:
        raise ParameterError(f"unknown recipe keys {unknown}; valid keys: {', '.join(_DICT_KEYS)}")
    terms: list[Term] = []
    if recipe.get("preset"):
        terms.append(Term(name=str(recipe["preset"]), kind="preset"))
    for kind in STAGE_KINDS:
        value = recipe.get(kind)
        if value is None:
            continue
        if isinstance(value, str):
            parsed = parse_recipe(value)
            if len(parsed) != 1:
                raise RecipeError(value, 0, f"the {kind!r} entry must name one stage")
            terms.append(Term(name=parsed[0].name, kind=kind, params=parsed[0].params))
        elif isinstance(value, Mapping) and "name" in value:
            rest = {k: v for k, v in value.items() if k != "name"}
            terms.append(Term(name=str(value["name"]), kind=kind, params=dict(rest)))
        else:
            raise ParameterError(f"the {kind!r} entry must be a stage recipe string or a mapping with 'name', got {value!r}")
    extra = dict(recipe.get("params") or {})
    return terms, extra


def _resolve(terms: list[Term], registry: Registry, text: str) -> tuple[Optional[str], dict[str, tuple[str, dict]]]:
    preset_name: Optional[str] = None
    explicit: dict[str, tuple[str, dict, int]] = {}
    last_kind = -1
    for index, term in enumerate(terms):
        if term.kind == "preset" or (term.kind is None and index == 0 and term.name in registry.presets):
            if term.name not in registry.presets:
                raise UnknownNameError("preset", term.name, registry.presets)
            if term.params:
                raise RecipeError(text, term.position, f"preset {term.name!r} takes no parameters; set them on its stages")
            preset_name = term.name
            continue
        if term.kind is not None:
            if term.kind not in STAGE_KINDS:
                raise UnknownNameError("stage kind", term.kind, STAGE_KINDS)
            registry.stage(term.kind, term.name)  # raises for an unknown name
            kind = term.kind
        else:
            kinds = registry.kinds_of(term.name)
            if not kinds:
                if term.name in registry.presets:
                    raise RecipeError(text, term.position, f"preset {term.name!r} must be the first term")
                choices = registry.all_stage_names() + sorted(registry.presets)
                raise UnknownNameError("stage or preset", term.name, choices)
            later = [k for k in kinds if STAGE_KINDS.index(k) > last_kind]
            kind = (later or kinds)[0]
        if kind in explicit:
            raise RecipeError(
                text,
                term.position,
                f"two {kind} stages: {explicit[kind][0]!r} and {term.name!r}; a recipe takes one stage of each kind",
            )
        explicit[kind] = (term.name, dict(term.params), term.position)
        last_kind = STAGE_KINDS.index(kind)
    base = {t.kind: (t.name, dict(t.params)) for t in _base_terms(preset_name, registry)}
    chosen = {}
    for kind in STAGE_KINDS:
        if kind in explicit:
            name, params, _ = explicit[kind]
            if base[kind][0] == name:
                params = {**base[kind][1], **params}
            chosen[kind] = (name, params)
        else:
            chosen[kind] = base[kind]
    return preset_name, chosen


def _base_terms(preset_name: Optional[str], registry: Registry) -> list[Term]:
    """The default stages, overlaid with the preset's stages (each qualified with its kind)."""
    default = {kind: term for kind, term in zip(STAGE_KINDS, _qualify(parse_recipe(DEFAULT_RECIPE), registry, DEFAULT_RECIPE))}
    if preset_name is None:
        return list(default.values())
    preset = registry.preset(preset_name)
    overrides = {t.kind: t for t in _qualify(parse_recipe(preset.recipe), registry, preset.recipe)}
    return [overrides.get(kind, default[kind]) for kind in STAGE_KINDS]


def _qualify(terms: list[Term], registry: Registry, text: str) -> list[Term]:
    """Give every term of a preset/default recipe its kind (same resolution rule as users get)."""
    out, last_kind = [], -1
    for term in terms:
        if term.kind is None:
            kinds = registry.kinds_of(term.name)
            if not kinds:
                raise VtpruneError(f"recipe {text!r} names {term.name!r}, which is not a registered stage")
            later = [k for k in kinds if STAGE_KINDS.index(k) > last_kind]
            term = Term(term.name, (later or kinds)[0], term.params, term.position)
        out.append(term)
        last_kind = STAGE_KINDS.index(term.kind)
    return out


# -- parameters and checks -------------------------------------------------------------------------


def _route_params(chosen: dict[str, tuple[str, dict]], params: Mapping[str, Any], registry: Registry) -> None:
    for key, value in params.items():
        kind, sep, name = key.partition("__")
        if sep:
            if kind not in STAGE_KINDS:
                raise ParameterError(f"parameter {key!r}: {kind!r} is not a stage kind ({', '.join(STAGE_KINDS)})")
            chosen[kind][1][name] = value
            continue
        owners = [
            k for k in STAGE_KINDS if any(s.name == key for s in stage_params(registry.stage(k, chosen[k][0])))
        ]
        if not owners:
            valid = sorted(
                f"{s.name} ({chosen[k][0]})" for k in STAGE_KINDS for s in stage_params(registry.stage(k, chosen[k][0]))
            )
            raise ParameterError(f"no stage of this pipeline has a parameter {key!r}; valid: {', '.join(valid) or 'none'}")
        if len(owners) > 1:
            options = ", ".join(f"{k}__{key}" for k in owners)
            raise ParameterError(f"parameter {key!r} is ambiguous (stages {owners}); write one of: {options}")
        chosen[owners[0]][1][key] = value


def _check_pipeline(pipeline: Pipeline, registry: Registry) -> None:
    if not pipeline.relevance.gives_scores and not pipeline.diversity.adds_tokens:
        raise VtpruneError(
            f"relevance {pipeline.relevance.name!r} gives no scores and diversity {pipeline.diversity.name!r} "
            "adds no tokens: nothing would be selected"
        )
    placement = pipeline.placement
    available = set(ALWAYS_PRESENT) | set(placement.provides)
    for item in registry.adapters.values():
        if placement.name in item.obj.placements:
            available |= set(item.obj.provides(placement.name))
    problems = []
    for stage in pipeline.stages:
        for signal in sorted(stage.requires - available):
            from .catalog import signal_providers

            problems.append(
                f"{stage.kind} stage {stage.name!r} needs signal {signal!r}, which placement "
                f"{placement.name!r} cannot provide ({signal_providers(signal, registry)})"
            )
    if problems:
        raise VtpruneError("; ".join(problems))
