"""vtprune.framework: stages, registry, `compose`, `prune`, `catalog`.

>>> from vtprune import framework
>>> str(framework.compose("critical+fps"))
'prompt_cosine(pool=mean)+critical+fps+split(critical=0.6)+pre_llm'
"""

from __future__ import annotations

from typing import Any

from .budget import resolve_budget, validate_budget
from .catalog import CatalogEntry, catalog, format_catalog
from .compose import DEFAULT_RECIPE, compose
from .errors import (
    BudgetError,
    MissingSignalError,
    ParameterError,
    RecipeError,
    RegistrationError,
    UnknownNameError,
    VtpruneError,
)
from .hookspecs import hookimpl, hookspec
from .pipeline import Pipeline
from .registry import Preset, Registry, build_registry, default_registry
from .selection import Selection, selection_from_masks
from .signals import Signals
from .stages import (
    STAGE_KINDS,
    Allocation,
    BudgetAllocator,
    CriticalSelector,
    DiversitySupplementer,
    Drop,
    LayerPlacement,
    RelevanceScorer,
    Stage,
    Supplement,
)

__all__ = [
    "Allocation",
    "BudgetAllocator",
    "BudgetError",
    "CatalogEntry",
    "CriticalSelector",
    "DEFAULT_RECIPE",
    "DiversitySupplementer",
    "Drop",
    "LayerPlacement",
    "MissingSignalError",
    "ParameterError",
    "Pipeline",
    "Preset",
    "RecipeError",
    "RegistrationError",
    "Registry",
    "RelevanceScorer",
    "STAGE_KINDS",
    "Selection",
    "Signals",
    "Stage",
    "Supplement",
    "UnknownNameError",
    "VtpruneError",
    "build_registry",
    "catalog",
    "compose",
    "default_registry",
    "format_catalog",
    "hookimpl",
    "hookspec",
    "prune",
    "resolve_budget",
    "selection_from_masks",
    "validate_budget",
]


def prune(model: Any, recipe: Any, budget: Any = 64, **params: Any) -> Any:
    """Attach a pruning pipeline to one model instance; see `vtprune.framework.prune_model`."""
    from .prune import prune as _prune

    return _prune(model, recipe, budget=budget, **params)
