"""The selection contract, as checks a plugin's own tests call.

:func:`check_pipeline` sweeps shapes, seeds, signal factories and budgets (int and float, keep-all included) and
runs `vtprune.testing.selection_checks.check_selection` (the per-batch properties, listed there) on each;
:func:`check_stage` / :func:`check_preset` compose a registered stage or preset into its standard pipelines first
(:func:`contract_recipes`) and check each; :func:`check_placement` checks a placement's drops. A failure raises
:class:`ContractError` (an ``AssertionError``) naming the stage or recipe, the property, the row, the budget and
the batch, e.g.::

    ContractError: [critical.my_topk: prompt_cosine+critical.my_topk+diversity.none] property 'padding never
    chosen' fails at budget=3, row 1 (lengths [9, 6], seed 0, ragged_signals): critical stage 'my_topk' picked
    padding [6, 7, 8]
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from vtprune.framework import Pipeline, Registry, Signals, build_registry, compose, default_registry, hookimpl
from vtprune.framework.errors import VtpruneError
from vtprune.framework.stages import Drop, Stage, zero_budget_allowed

from .selection_checks import ContractError, _same, _Where, adaptive_counts, check_selection
from .signals import clustered_signals, ragged_signals, signals_for

__all__ = [
    "ContractError",
    "adaptive_counts",
    "DEFAULT_BUDGETS",
    "DEFAULT_FACTORIES",
    "DEFAULT_SEEDS",
    "DEFAULT_SHAPES",
    "DROP_POINTS",
    "check_pipeline",
    "check_placement",
    "check_preset",
    "check_selection",
    "check_stage",
    "compose_for_contract",
    "contract_recipes",
]

#: Budgets every sweep runs: token counts (1 = the smallest budget) and fractions, round-half cases included.
DEFAULT_BUDGETS: tuple[int | float, ...] = (1, 3, 8, 0.25, 0.5)
#: Row lengths of the batches a sweep runs: one image, ragged rows (a row of one token, a prime row), equal rows.
DEFAULT_SHAPES: tuple[tuple[int, ...], ...] = ((16,), (9, 6), (1, 7, 20), (12, 12))
DEFAULT_SEEDS: tuple[int, ...] = (0, 1)
#: Signal factories a sweep runs: random values with per-row grids, and clustered tokens with exact ties.
DEFAULT_FACTORIES: tuple[Callable[..., Signals], ...] = (ragged_signals, clustered_signals)
#: A budget far above every test row (keep-all).
LARGE_BUDGET = 10_000
#: Where a placement may drop tokens (`Drop.where`).
DROP_POINTS = ("vision", "pre_llm", "layer", "vision_layers")


# ---------------------------------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------------------------------


def check_pipeline(
    pipeline: Any,
    *,
    registry: Optional[Registry] = None,
    budgets: Sequence[Any] = DEFAULT_BUDGETS,
    shapes: Sequence[Sequence[int]] = DEFAULT_SHAPES,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    factories: Sequence[Callable[..., Signals]] = DEFAULT_FACTORIES,
    top_scores: bool = True,
    label: Optional[str] = None,
) -> None:
    """Check the selection contract of a pipeline or recipe over every shape x seed x factory x budget.

    Args:
        pipeline: a recipe (string or dict, composed with :func:`compose_for_contract` in ``registry``, so a
            recipe whose signals ``pre_llm`` lacks gets a placement that provides them), a `Pipeline`, or any
            object with ``select``.
        registry: where recipe names resolve (default: the installed plugins, so plugin stages are found).
        budgets: requested budgets; keep-all budgets (the largest row, 10000 and 1.0) are always added. By default
            :data:`DEFAULT_BUDGETS`, or the allocator's ``budget_settings`` where its budget is a setting (SparseVLM).
        shapes: row lengths of each batch.
        seeds: seeds of the signal factories.
        factories: ``factory(lengths, seed=seed) -> Signals`` (see `vtprune.testing.signals`).
        top_scores: see :func:`check_selection`.
        label: what failure messages call it (default: the recipe).
    Raises: `ContractError` on the first broken property.
    """
    if isinstance(pipeline, (str, dict)):
        label = label or (pipeline if isinstance(pipeline, str) else str(pipeline))
        pipeline = compose_for_contract(pipeline, registry)
    label = label or str(pipeline)
    settings = tuple(getattr(getattr(pipeline, "budget", None), "budget_settings", ()))
    if settings and budgets is DEFAULT_BUDGETS:
        budgets = settings  # an allocator whose budget is a setting: its valid settings instead of counts
        if not zero_budget_allowed(pipeline):  # the setting 0 (VTW) is a budget only at a withdrawing placement
            budgets = tuple(b for b in budgets if b != 0)
    if isinstance(pipeline, Pipeline):
        check_placement(pipeline.placement, budgets, label=label)
    for factory in factories:
        for lengths in shapes:
            for seed in seeds:
                signals = factory(list(lengths), seed=seed)
                context = f"lengths {list(lengths)}, seed {seed}, {getattr(factory, '__name__', factory)}"
                # keep-all budgets: every row the allocator's rule covers (`BudgetAllocator.covers`) is checked whole
                for budget in [*budgets, max(lengths), LARGE_BUDGET, 1.0]:
                    check_selection(pipeline, signals, budget, label=label, context=context, top_scores=top_scores)
    _check_requires(pipeline, label, budgets[0] if budgets else 1.0, top_scores)


def _check_requires(pipeline: Any, label: str, budget: Any, top_scores: bool) -> None:
    """Signals holding only the declared fields give the same selection as full signals."""
    requires = getattr(pipeline, "requires", None)
    if requires is None:
        return
    lengths = [int(n) for n in DEFAULT_SHAPES[1]]
    full = ragged_signals(lengths, seed=0)
    partial = signals_for(requires, lengths, seed=0)
    where = _Where(label, budget, f"lengths {lengths}, seed 0, signals_for({sorted(requires)})")
    try:
        pipeline.select(partial, budget)
    except Exception as error:  # a stage read a field it did not declare
        raise where.fail(
            "requires declared", f"select failed on signals holding only the declared fields: {type(error).__name__}: {error}"
        ) from error
    sparse = check_selection(pipeline, partial, budget, label=label, context=where.context, top_scores=top_scores, padding=False)
    dense = pipeline.select(full, budget)
    for row in range(full.batch_size):
        problem = _same(dense, sparse, row, row, full.visual, partial.visual)
        if problem:
            raise where.fail("requires declared", f"with only the declared fields the row {problem}", row)


def check_placement(placement: Any, budgets: Sequence[Any] = DEFAULT_BUDGETS, *, label: Optional[str] = None) -> None:
    """A placement's ``drops(budget)``: a non-empty tuple of `Drop` in model order, ``where`` one of
    :data:`DROP_POINTS`, ``layer`` a non-negative int exactly for ``"layer"``, at most one drop before the LLM."""
    label = label or f"placement.{getattr(placement, 'name', placement)}"
    for budget in budgets:
        where = _Where(label, budget, "placement.drops")
        drops = placement.drops(budget)
        if not isinstance(drops, tuple) or not drops or not all(isinstance(d, Drop) for d in drops):
            raise where.fail("placement drops", f"drops() must return a non-empty tuple of Drop, got {drops!r}")
        order = []
        for drop in drops:
            if drop.where not in DROP_POINTS:
                raise where.fail("placement drops", f"Drop.where {drop.where!r} is not one of {DROP_POINTS}")
            if (drop.where == "layer") != isinstance(drop.layer, int) or (drop.layer is not None and drop.layer < 0):
                raise where.fail("placement drops", f"Drop.layer must be a layer index >= 0 exactly for 'layer', got {drop!r}")
            order.append(-1 if drop.layer is None else drop.layer)
        if order != sorted(order) or len(set(order)) != len(order):
            raise where.fail("placement drops", f"drops are not in model order: {drops!r}")


# ---------------------------------------------------------------------------------------------------------------
# Registered stages and presets
# ---------------------------------------------------------------------------------------------------------------


def contract_recipes(kind: str, name: str, registry: Optional[Registry] = None) -> list[str]:
    """The standard pipelines that test one registered stage (or preset) among default stages.

    - ``preset``: the preset itself;
    - ``relevance``: ``relevance.NAME+critical+fps``;
    - ``critical``: ``prompt_cosine+critical.NAME+diversity.none`` (the selector fills the whole budget);
    - ``diversity``: ``prompt_cosine+critical+diversity.NAME``, and ``relevance.none+diversity.NAME`` for a stage
      that adds tokens (it then fills the whole budget);
    - ``budget``: ``prompt_cosine+critical+fps+budget.NAME``;
    - ``placement``: ``relevance.none+critical+fps+placement.NAME`` (no signal beyond ``visual``).
    """
    registry = default_registry(registry)
    if kind == "preset":
        registry.preset(name)
        return [name]
    stage = registry.stage(kind, name)  # raises naming the valid choices
    if kind == "relevance":
        return [f"relevance.{name}+critical+fps"]
    if kind == "critical":
        return [f"prompt_cosine+critical.{name}+diversity.none"]
    if kind == "diversity":
        recipes = [f"prompt_cosine+critical+diversity.{name}"]
        if stage.adds_tokens:
            recipes.append(f"relevance.none+diversity.{name}")
        return recipes
    if kind == "budget":
        return [f"prompt_cosine+critical+fps+budget.{name}"]
    return [f"relevance.none+critical+fps+placement.{name}"]


def compose_for_contract(recipe: Any, registry: Optional[Registry] = None) -> Pipeline:
    """``compose(recipe)``; a recipe string whose stages need signals its placement cannot provide is retried with
    each registered placement appended, in registration order (selection does not depend on the placement).
    When none fits, the first error is raised."""
    registry = default_registry(registry)
    try:
        return compose(recipe, registry=registry)
    except VtpruneError as error:
        if not isinstance(recipe, str):
            raise
        first = error
    for name in registry.stages["placement"]:
        try:
            return compose(f"{recipe}+placement.{name}", registry=registry)
        except VtpruneError:
            continue
    raise first


def check_stage(
    kind: Any, name: Optional[str] = None, *, registry: Optional[Registry] = None, **options: Any
) -> None:
    """Check a stage in each of its standard pipelines (:func:`contract_recipes`); ``options`` go to
    :func:`check_pipeline`.

    Either a registered stage by kind and name (``check_stage("relevance", "token_norm")``, resolved in ``registry``,
    default: the installed plugins), or a stage class itself (``check_stage(TokenNorm)``): a class that ``registry``
    does not hold under its name is registered in a fresh registry of the built-ins, so a stage can be checked
    before its plugin is installed.
    """
    if isinstance(kind, type) and issubclass(kind, Stage):
        registry = _registry_with(kind, registry)
        kind, name = kind.kind, kind.name
    if name is None:
        raise TypeError("check_stage takes a stage class, or a kind and a name: check_stage('relevance', 'token_norm')")
    registry = default_registry(registry)
    for recipe in contract_recipes(kind, name, registry):
        check_pipeline(recipe, registry=registry, label=f"{kind}.{name}: {recipe}", **options)


def _registry_with(cls: type[Stage], registry: Optional[Registry]) -> Registry:
    """``registry`` (default: installed plugins) if it holds ``cls`` under its name, else built-ins + ``cls``."""
    registry = default_registry(registry)
    table = registry.stages.get(cls.kind, {})
    if cls.name in table and table[cls.name].obj is cls:
        return registry

    class _OneStage:
        """A plugin registering only ``cls``."""

        @hookimpl
        def vtprune_register_stages(self, registry: Registry) -> None:
            registry.add_stage(cls)

    return build_registry(autoload=False, plugins=[_OneStage()])


def check_preset(name: str, *, registry: Optional[Registry] = None, **options: Any) -> None:
    """Check a registered preset (its pipeline); ``options`` go to :func:`check_pipeline`."""
    check_pipeline(name, registry=default_registry(registry), label=f"preset.{name}", **options)
