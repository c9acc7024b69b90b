"""vtprune.framework: stages, registry, `compose`, `prune`, `catalog`.

>>> from vtprune import framework
>>> str(framework.compose("critical+fps"))
'prompt_cosine(pool=mean)+critical+fps+split(critical=0.6)+pre_llm'
"""

from __future__ import annotations

from .budget import normalize_budget, resolve_budget, validate_budget
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
    "normalize_budget",
    "PruneHandle",
    "prune",
    "resolve_budget",
    "selection_from_masks",
    "validate_budget",
]

# Imported last: binding the function after the submodule import keeps `framework.prune` the
# function (the submodule `vtprune.framework.prune` is reachable through sys.modules).
from .prune import PruneHandle, prune  # noqa: E402
