"""Recipe names: which registered thing a recipe term names, and how each is spelled unambiguously.

One name may be registered several times: as a preset and as stages of several kinds (``fastv`` is
a preset and a budget stage, ``none`` a relevance and a diversity stage). The rule that reads a
term (docs/architecture.md, "Names"):

1. ``kind.name`` names the stage ``name`` of that kind; ``preset.name`` names a preset and must be
   the first term.
2. A bare first term that is a preset name is that preset (``fastv``, ``divprune``,
   ``zspaprune+kmeans``): presets are the promised way to start a recipe.
3. A bare later term that is also a preset name is an error: the preset cannot be meant there
   (a recipe has one preset, first) and reading it silently as a stage of the same name
   surprises (``zspaprune+divprune+fastv``). The message lists the qualified spellings.
4. A bare stage name registered under one kind is that stage. A name several kinds share is read
   as the one of its kinds that fits the canonical kind order (relevance, critical, diversity,
   budget, placement) between its neighbours: after the previous term's kind and before the next
   term's kind (when the next term has a single kind). ``critical+none`` is diversity ``none``,
   ``none+fps`` relevance ``none``; when none or several kinds fit (``none`` alone,
   ``critical+dart``) it is an error listing the qualified spellings.

Canonical recipes (``str(pipeline)``) qualify every shared name, so they read back to the same
pipeline under this rule.
"""

from __future__ import annotations

from typing import Optional

from .errors import RecipeError, UnknownNameError, nearest
from .recipe import Term
from .stages import STAGE_KINDS
from .tables import Registry

__all__ = ["PRESET_KIND", "is_shared", "meanings", "resolve_terms", "spellings", "unknown_name"]

#: The qualifier that names a preset explicitly (``preset.fastv``).
PRESET_KIND = "preset"


def meanings(name: str, registry: Registry) -> list[str]:
    """Every qualified spelling of ``name``: ``kind.name`` per stage kind, then ``preset.name``."""
    out = [f"{kind}.{name}" for kind in registry.kinds_of(name)]
    if name in registry.presets:
        out.append(f"{PRESET_KIND}.{name}")
    return out


def is_shared(name: str, registry: Registry) -> bool:
    """Whether ``name`` is registered more than once (stages of several kinds and/or a preset)."""
    return len(meanings(name, registry)) > 1


def spellings(registry: Registry) -> list[str]:
    """Every stage and preset name once, sorted; a shared name as each of its qualified spellings."""
    names = {name for table in registry.stages.values() for name in table} | set(registry.presets)
    out = []
    for name in sorted(names):
        out.extend(meanings(name, registry) if is_shared(name, registry) else [name])
    return out


def unknown_name(name: str, registry: Registry) -> UnknownNameError:
    """`UnknownNameError` for a bare term: the valid spellings, each once, and the nearest name."""
    names = {name for table in registry.stages.values() for name in table} | set(registry.presets)
    closest = nearest(name, names)
    hint = ""
    if closest is not None:
        hint = f"{closest!r}"
        if is_shared(closest, registry):
            hint += f" ({', '.join(meanings(closest, registry))})"
    return UnknownNameError("stage or preset", name, spellings(registry), hint=hint)


def _single_kind(term: Term, registry: Registry) -> Optional[int]:
    """The canonical index of the kind ``term`` names when that is certain without context."""
    if term.kind in STAGE_KINDS:
        return STAGE_KINDS.index(term.kind)
    if term.kind is None and term.name not in registry.presets:
        kinds = registry.kinds_of(term.name)
        if len(kinds) == 1:
            return STAGE_KINDS.index(kinds[0])
    return None


def resolve_terms(
    terms: list[Term], registry: Registry, text: str, *, allow_preset: bool = True
) -> tuple[Optional[str], list[Term]]:
    """Read every term with the rule above: ``(preset name or None, the stage terms with their kind)``.

    ``allow_preset=False`` for the recipe of a preset itself (stage terms only). Raises
    `UnknownNameError` for an unknown name and `RecipeError` (with the position) for a preset
    that is not first or a bare name that does not name exactly one thing.
    """
    preset: Optional[str] = None
    out: list[Term] = []
    last = -1
    for index, term in enumerate(terms):
        name = term.name
        if term.kind == PRESET_KIND or (term.kind is None and index == 0 and allow_preset and name in registry.presets):
            if name not in registry.presets:
                raise UnknownNameError("preset", name, registry.presets)
            if index != 0 or not allow_preset:
                raise RecipeError(text, term.position, f"preset {name!r} can only be the first term of a recipe")
            if term.params:
                raise RecipeError(text, term.position, f"preset {name!r} takes no parameters; set them on its stages")
            preset = name
            continue
        if term.kind is not None:
            if term.kind not in STAGE_KINDS:
                raise UnknownNameError("stage kind", term.kind, (*STAGE_KINDS, PRESET_KIND))
            registry.stage(term.kind, name)  # raises UnknownNameError for an unknown name
            kind = term.kind
        else:
            kind = _bare_kind(terms, index, last, registry, text)
        out.append(Term(name, kind, term.params, term.position))
        last = STAGE_KINDS.index(kind)
    return preset, out


def _bare_kind(terms: list[Term], index: int, last: int, registry: Registry, text: str) -> str:
    term = terms[index]
    kinds = registry.kinds_of(term.name)
    if term.name in registry.presets:
        if not kinds:
            raise RecipeError(text, term.position, f"preset {term.name!r} can only be the first term of a recipe")
        stages = " or ".join(f"{kind}.{term.name}" for kind in kinds)
        raise RecipeError(
            text,
            term.position,
            f"{term.name!r} is ambiguous here: it is a preset and a {'/'.join(kinds)} stage, and only the "
            f"first term of a recipe can name a preset; write {stages} for the stage (the preset, "
            f"{term.name} or {PRESET_KIND}.{term.name}, can only start a recipe)",
        )
    if not kinds:
        raise unknown_name(term.name, registry)
    if len(kinds) == 1:
        return kinds[0]
    following = _single_kind(terms[index + 1], registry) if index + 1 < len(terms) else None
    upper = len(STAGE_KINDS) if following is None else following
    fits = [kind for kind in kinds if last < STAGE_KINDS.index(kind) < upper]
    if len(fits) == 1:
        return fits[0]
    options = ", ".join(meanings(term.name, registry))
    raise RecipeError(
        text,
        term.position,
        f"{term.name!r} names stages of several kinds ({', '.join(kinds)}) and its place in the recipe "
        f"does not decide which; write one of: {options}",
    )
