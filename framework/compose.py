"""`compose`: recipe (string, dict or `Pipeline`) -> validated `Pipeline`.

Rules (docs/architecture.md has the long form):

- A recipe names at most one preset and at most one stage of each kind. A preset supplies the
  stages it names; explicitly named stages replace the preset's stage of the same kind (keeping
  the preset's parameters when the same stage is named again with more parameters); every other
  kind takes the framework default (:data:`DEFAULT_RECIPE`, the ZSPAPrune composition).
- Names (`vtprune.framework.names`): ``kind.name`` / ``preset.name`` are explicit; a bare first
  term that is a preset name is the preset; a later bare term must name exactly one stage (a
  preset name there, or a shared name that the canonical kind order between its neighbours does
  not decide, raises `RecipeError` listing the qualified spellings). Canonical recipes qualify
  every shared name.
- ``**params`` set stage parameters: ``name=value`` goes to the one stage that has a parameter
  of that name; ``kind__name=value`` targets one kind.
- Everything is checked before any tensor is touched; errors list the valid choices.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from .errors import ParameterError, RecipeError, VtpruneError
from .names import PRESET_KIND, is_shared, resolve_terms
from .params import bind_params
from .pipeline import Pipeline
from .providers import signal_providers
from .recipe import Term, format_term, parse_recipe
from .registry import Registry, default_registry
from .signals import ALWAYS_PRESENT
from .stages import STAGE_KINDS, stage_params
from .support import adapter_drop_kinds, pipeline_drop_kinds, provided_signals

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
    qualified = frozenset(stage.name for stage in stages.values() if is_shared(stage.name, registry))
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
        terms.append(Term(name=str(recipe["preset"]), kind=PRESET_KIND))
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
    preset_name, stage_terms = resolve_terms(terms, registry, text)
    explicit: dict[str, Term] = {}
    for term in stage_terms:
        if term.kind in explicit:
            raise RecipeError(
                text,
                term.position,
                f"two {term.kind} stages: {explicit[term.kind].name!r} and {term.name!r}; a recipe takes one stage of each kind",
            )
        explicit[term.kind] = term
    base = {t.kind: (t.name, dict(t.params)) for t in _base_terms(preset_name, registry)}
    chosen = {}
    for kind in STAGE_KINDS:
        if kind in explicit:
            name, params = explicit[kind].name, dict(explicit[kind].params)
            if base[kind][0] == name:
                params = {**base[kind][1], **params}
            _inherit_prefill(kind, name, params, base[kind], registry)
            chosen[kind] = (name, params)
        else:
            chosen[kind] = base[kind]
    return preset_name, chosen


def _inherit_prefill(kind: str, name: str, params: dict, base: tuple[str, dict], registry: Registry) -> None:
    """A placement that wraps another (``prefill_param``, e.g. ``decode``) and is named without it takes the
    placement the recipe would otherwise use (the preset's or the default), as a recipe term."""
    field_name = getattr(registry.stage(kind, name), "prefill_param", None) if kind == "placement" else None
    if field_name and field_name not in params and base[0] != name:
        params[field_name] = format_term(base[0], dict(base[1]))


def _base_terms(preset_name: Optional[str], registry: Registry) -> list[Term]:
    """The default stages, overlaid with the preset's stages (each qualified with its kind)."""
    default = {t.kind: t for t in _stage_terms(DEFAULT_RECIPE, registry)}
    if preset_name is None:
        return [default[kind] for kind in STAGE_KINDS]
    overrides = {t.kind: t for t in _stage_terms(registry.preset(preset_name).recipe, registry)}
    return [overrides.get(kind, default[kind]) for kind in STAGE_KINDS]


def _stage_terms(recipe: str, registry: Registry) -> list[Term]:
    """The terms of a preset's (or the default) recipe, each with its kind (the users' rule)."""
    try:
        return resolve_terms(parse_recipe(recipe), registry, recipe, allow_preset=False)[1]
    except VtpruneError as error:
        raise VtpruneError(f"the registered recipe {recipe!r} does not compose: {error}") from None


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
    keeps = getattr(pipeline.budget, "keeps_tokens", True)  # False: the allocator keeps no token short of keep-all (VTW)
    if keeps and not pipeline.relevance.gives_scores and not pipeline.diversity.adds_tokens:
        raise VtpruneError(
            f"relevance {pipeline.relevance.name!r} gives no scores and diversity {pipeline.diversity.name!r} "
            "adds no tokens: nothing would be selected"
        )
    placement = pipeline.placement
    available = set(ALWAYS_PRESENT) | set(placement.provides)
    # what some registered adapter fills at this placement's drop kinds (the one rule of framework/support.py;
    # a placement wrapping a prefill placement, ``decode``, has that placement's drops)
    kinds = pipeline_drop_kinds(pipeline)
    requested = frozenset(placement.provides)
    for item in registry.adapters.values():
        if set(kinds) <= adapter_drop_kinds(item.obj):
            for kind in kinds:
                available |= provided_signals(item.obj, kind, requested)
    problems = []
    for stage in pipeline.stages:
        for signal in sorted(stage.requires - available):
            problems.append(
                f"{stage.kind} stage {stage.name!r} needs signal {signal!r}, which placement "
                f"{placement.name!r} cannot provide ({signal_providers(signal, registry)})"
            )
    if problems:
        raise VtpruneError("; ".join(problems))
