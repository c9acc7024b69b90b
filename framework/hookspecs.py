"""Every extension point of vtprune. Each hook's docstring is its contract.

A plugin is a module (or object) with functions decorated by ``vtprune.framework.hookimpl`` whose
names are the hooks below. Built-in stages, presets and adapters are ordinary plugins
(``vtprune.strategies.plugin``, ``vtprune.adapters.plugin``); third-party packages add theirs with
an entry point in the ``vtprune`` group::

    [project.entry-points.vtprune]
    my_stages = "my_package.my_module"

and vtprune picks them up with no change to its code (``framework.build_registry(autoload=False)``
skips entry points for reproducible runs).

Registration hooks receive a `Registry` and call its ``add_*`` methods; every implementation is
called (no first-result-wins), in pluggy's order. A name registered twice raises
`RegistrationError` naming both plugins.
"""

from __future__ import annotations

import pluggy

from .tables import Registry

__all__ = ["PROJECT", "hookspec", "hookimpl"]

PROJECT = "vtprune"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------------------------------------
# Pruning stages and presets
# ---------------------------------------------------------------------------------------------


@hookspec
def vtprune_register_stages(registry: Registry) -> None:
    """Register stage classes with ``registry.add_stage(cls)``.

    ``cls`` subclasses one of the five stage bases in ``vtprune.framework.stages`` and sets:

    - ``name``: unique within its kind, lower_snake_case, used in recipes; a name that another
      kind or a preset also uses is written ``kind.name`` where a bare name would be ambiguous
      (the rule: ``vtprune.framework.names``);
    - ``description``: one line for ``vtprune list``;
    - ``requires``: the `Signals` fields it reads besides ``visual``/``visual_mask``; a pipeline
      whose placement cannot provide one fails at ``compose`` time, and a pruning point that lacks
      one fails with `MissingSignalError` naming the placements and adapters that provide it;
    - its parameters as keyword arguments of ``__init__``, each with a type hint and a default.

    The per-kind method contracts (shapes, dtypes, what None means, what the result must satisfy)
    are the docstrings of ``RelevanceScorer.score``, ``CriticalSelector.select``,
    ``DiversitySupplementer.supplement``, ``BudgetAllocator.allocate`` / ``resolve`` and
    ``LayerPlacement.drops``. In short:

    - relevance: Signals -> (B, N) float32 scores (higher = more relevant) or None;
    - critical: scores, counts (B,), valid (B, N) -> (B, N) bool with exactly counts[b] picks;
    - diversity: Signals, selected (B, N), counts, valid, scores -> `Supplement` (picks disjoint
      from ``selected``, exactly counts[b] of them, optional merged values);
    - budget: totals (B,), valid, scores -> `Allocation` (total, critical), 0 <= critical <= total;
    - placement: budget -> tuple of `Drop` points; ``provides`` lists the signals available there.

    Rows are independent: a stage never couples two rows of a batch.
    """


@hookspec
def vtprune_register_presets(registry: Registry) -> None:
    """Register named compositions with ``registry.add_preset(name, recipe, description, ...)``.

    ``recipe`` uses the recipe grammar with stage names only (no other preset); stages it does not
    name take the framework defaults. A preset may name its paper and official code for the
    catalog. Users swap one stage with ``"preset+stage"``.
    """


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


@hookspec
def vtprune_register_adapters(registry: Registry) -> None:
    """Register model adapters with ``registry.add_adapter(cls)``.

    An adapter class is a *description* of a model family: ``name``, ``model_classes`` (the class
    names of the models it attaches to), ``drop_kinds`` (the `Drop.where` kinds it implements:
    "vision", "pre_llm", "layer", "vision_layers"), ``provides(kind) -> frozenset[str]`` (the signals it fills at
    drops of that kind), ``limitations`` (name -> reason, quoted in errors), ``runtime`` (the
    function that installs the hooks: ``runtime(adapter(model), pipeline, budget, plan_factory=
    adapter.plan_factory, positions=..., prompt_stop=..., **options)``) and ``plan_factory``.
    Support is decided by ``vtprune.framework.support`` from this data alone, so a third-party
    placement works wherever its drop kinds are implemented. ``framework.prune`` picks the adapter
    whose ``model_classes`` contains the model's class name (or a base class's name), else the first whose
    optional capability probe ``accepts(model)`` is true (the generic adapter), or the one registered under
    ``adapter=``. docs/adapters.md describes the contract.
    """


# ---------------------------------------------------------------------------------------------
# Experiments
# ---------------------------------------------------------------------------------------------


@hookspec
def vtprune_register_tasks(registry: Registry) -> None:
    """Register evaluation task classes with ``registry.add_task(name, factory, description)``.

    ``factory(**options)`` returns an object with ``samples(limit=None)`` and ``score(sample,
    prediction) -> dict[str, float]`` (see ``vtprune.experiments.tasks``).
    """


@hookspec
def vtprune_register_launchers(registry: Registry) -> None:
    """Register grid launchers with ``registry.add_launcher(name, factory, description)``.

    ``factory(**options)`` returns an object with ``launch(cells, run_cell) -> None`` that runs
    every cell (in-process, or as cluster jobs) and may return before they finish only if the
    results directory makes completion observable.
    """
