"""The composed pruning `Pipeline` of a run, built once per distinct method.

`build_pipeline` turns a run's ``method`` / ``placement`` / ``seed`` into a `Pipeline`;
`canonical_recipe` is that pipeline with every parameter resolved (defaults included: what a cell's
key hashes, so a changed stage default gives a new key) and `recipe_versions` the versions of
vtprune and of the distributions whose stages it runs (recorded per cell, to tell stale results).
`PipelineCache` keeps the pipelines of one grid keyed by that resolved method, so validation
(`vtprune.experiments.validation`) and running (`vtprune.experiments.runner`) share one composed
pipeline per cell instead of composing the recipe again.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Sequence

__all__ = ["build_pipeline", "method_key", "PipelineCache", "canonical_recipe", "recipe_versions", "draws_random"]


def build_pipeline(run: Mapping[str, Any], registry: Any = None) -> Any:
    """The composed `Pipeline` of a run (None for the unpruned run): ``method.recipe`` with
    ``method.params``, the ``placement`` override, and the run seed for every stage ``seed``
    parameter left at its default."""
    from vtprune.framework.compose import compose

    method = run.get("method")
    if method is None:
        return None
    params = dict(method.get("params") or {})
    pipeline = compose(method["recipe"], registry=registry, **params)
    if run.get("placement"):
        recipe = pipeline.to_dict()
        recipe["placement"] = run["placement"]
        if pipeline.preset:
            recipe["preset"] = pipeline.preset
        pipeline = compose(recipe, registry=registry)
    seeds = {}
    for stage in pipeline.stages:
        spec = {p.name: p.default for p in _params(stage)}
        if "seed" in spec and stage.params["seed"] == spec["seed"]:
            seeds[f"{stage.kind}__seed"] = int(run.get("seed", 0))
    if seeds:
        pipeline = compose(pipeline, registry=registry, **seeds)
    return pipeline


def canonical_recipe(pipeline: Any) -> Optional[dict[str, Any]]:
    """``{kind: {"name": ..., every parameter: its value}}`` of a composed pipeline (None for the
    unpruned run): unlike ``Pipeline.to_dict``, parameters left at their defaults are included."""
    if pipeline is None:
        return None
    return {stage.kind: {"name": stage.name, **stage.params} for stage in pipeline.stages}


def draws_random(pipeline: Any) -> bool:
    """Whether any stage of the pipeline draws random numbers (`vtprune.framework.stages.is_stochastic`)."""
    from vtprune.framework.stages import is_stochastic

    return pipeline is not None and any(is_stochastic(stage) for stage in pipeline.stages)


def recipe_versions(pipeline: Any) -> dict[str, str]:
    """``{distribution: version}`` for vtprune and every installed distribution providing one of
    the pipeline's stages (a stage defined outside any distribution adds nothing)."""
    import importlib.metadata

    import vtprune

    out = {"vtprune": vtprune.__version__}
    modules = {type(stage).__module__.split(".")[0] for stage in (pipeline.stages if pipeline is not None else ())}
    modules.discard("vtprune")
    if modules:
        owners = importlib.metadata.packages_distributions()
        for module in sorted(modules):
            for dist in owners.get(module, ()):
                try:
                    out[dist] = importlib.metadata.version(dist)
                except importlib.metadata.PackageNotFoundError:
                    continue
    return out


def _params(stage: Any) -> Sequence[Any]:
    from vtprune.framework.stages import stage_params

    return stage_params(type(stage))


def method_key(run: Mapping[str, Any]) -> str:
    """What `build_pipeline` reads of a run (method, placement, seed), as canonical JSON."""
    view = {"method": run.get("method"), "placement": run.get("placement"), "seed": run.get("seed", 0)}
    return json.dumps(view, sort_keys=True, default=str)


class PipelineCache:
    """The pipelines of one registry, each composed once per `method_key`.

    A run whose recipe does not compose raises from `get` every time (nothing is cached for it).
    """

    def __init__(self, registry: Any = None) -> None:
        self.registry = registry
        self._built: dict[str, Any] = {}

    def get(self, run: Mapping[str, Any]) -> Optional[Any]:
        """The run's `Pipeline` (None for the unpruned run), composed on first request."""
        key = method_key(run)
        if key not in self._built:
            self._built[key] = build_pipeline(run, self.registry)
        return self._built[key]

    def __len__(self) -> int:
        return len(self._built)
