"""Grid files: `load_grid` reads, composes, overrides, type-checks, expands and validates a grid.

>>> spec = load_grid({"base": {"model": {"name": "dummy"}, "task": {"name": "synthetic"}},
...                   "grid": {"budget": [8, 16]}, "baseline": False}, registry=_registry())
>>> [cell.assignment for cell in spec.cells]
[{'budget': 8}, {'budget': 16}]

Everything is checked before any model loads, and every problem is reported at once in one
`ConfigError` with the key path of each (``base.task.name``, ``grid.budget[2]``,
``include[0].method.recipe``). YAML is read with ``yaml.safe_load``; OmegaConf resolves
``${...}`` interpolations with its built-in resolvers only (vtprune registers none), so nothing in
a config runs code.

This module is the entry point and re-exports the public names of the modules it composes:
`vtprune.experiments.gridfiles` (reading files and overrides), `vtprune.experiments.cells`
(`Cell`, `cell_key`, `expand`), `vtprune.experiments.validation` (the checks) and
`vtprune.experiments.pipelines` (`build_pipeline`, composed once per cell).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from vtprune.framework.typecheck import check_mapping, check_value, close_match, signature_problem, type_at

from .cells import Cell, baseline_config, cell_key, expand, first_seed_only, method_label, rekey
from .gridfiles import (
    CONFIG_DIR,
    ConfigError,
    apply_overrides,
    deep_merge,
    get_dotted,
    parse_overrides,
    read_config_file,
    set_dotted,
)
from .pipelines import PipelineCache, build_pipeline, canonical_recipe, draws_random
from .schema import GridConfig, RunConfig
from .validation import check_grid, validate_cells, without

__all__ = [
    "ConfigError",
    "Cell",
    "GridSpec",
    "load_grid",
    "read_config_file",
    "parse_overrides",
    "apply_overrides",
    "expand",
    "cell_key",
    "baseline_config",
    "method_label",
    "build_pipeline",
    "PipelineCache",
    "validate_cells",
    "deep_merge",
    "set_dotted",
    "get_dotted",
    "CONFIG_DIR",
    # the type walker, now `vtprune.framework.typecheck` (re-exported for the old import path)
    "check_value",
    "check_mapping",
    "type_at",
    "signature_problem",
]


@dataclass
class GridSpec:
    """A validated grid: its name, plain config, typed OmegaConf config and cells, and the
    pipelines composed while validating it (`PipelineCache`; the runner re-uses them)."""

    name: str
    raw: dict[str, Any]
    config: Any
    cells: list[Cell]
    source: str = ""
    pipelines: PipelineCache = field(default_factory=PipelineCache)

    @property
    def output_dir(self) -> Path:
        return Path(self.raw.get("base", {}).get("output_dir") or RunConfig.output_dir)


def load_grid(
    source: Union[str, Path, Mapping[str, Any]],
    overrides: Sequence[Union[str, tuple[str, Any]]] = (),
    registry: Any = None,
    check_models: bool = True,
) -> GridSpec:
    """Read, compose, override, type-check, expand and validate a grid; raise one `ConfigError`
    listing every problem. Nothing is loaded but the (small) model config files, and those only
    from local directories or the local Hugging Face cache (``check_models=False`` skips them)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from vtprune.framework.registry import default_registry

    registry = default_registry(registry)
    if isinstance(source, Mapping):
        raw, label, name = copy.deepcopy(dict(source)), "the config", ""
    else:
        raw, label, name = read_config_file(source), str(source), Path(source).stem
    pairs = [parse_overrides([o])[0] if isinstance(o, str) else o for o in overrides]
    raw = apply_overrides(raw, pairs)
    try:
        raw = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)  # type: ignore[assignment]
    except OmegaConfBaseException as error:
        raise ConfigError([f"interpolation: {error}".replace("\n", " ")], label) from None
    # One pass: the type check, then every semantic check on what type-checked (values with a
    # type problem are left out, so each problem is reported once, at its own key path).
    problems = check_grid(raw)
    pipelines = PipelineCache(registry)
    name = raw.get("name") if isinstance(raw.get("name"), str) and raw.get("name") else (name or "grid")
    clean = without(raw, [p.split(": ", 1)[0] for p in problems]) if problems else raw
    clean["name"] = name
    try:
        cells = expand(clean, name)
        if not cells and not problems:
            problems.append("grid: every cell is excluded; nothing to run")
        problems += validate_cells(cells, registry, check_models, pipelines)
    except Exception:  # noqa: BLE001 - only where the type check already found the cause
        if not problems:
            raise
    launcher = (clean.get("launcher") or {}).get("name", "local")
    if isinstance(launcher, str) and launcher not in registry.launchers:
        hint = close_match(launcher, registry.launchers)
        problems.append(
            f"launcher.name: unknown launcher {launcher!r}" + (f" (did you mean {hint!r}?)" if hint else "")
            + f"; valid: {', '.join(sorted(registry.launchers))}"
        )
    if problems:
        raise ConfigError(problems, label)
    raw["name"] = name
    if raw.get("seeds_for", "stochastic") == "stochastic":
        cells = first_seed_only(cells, lambda run: draws_random(pipelines.get(run)))
    cells = rekey(cells, lambda run: canonical_recipe(pipelines.get(run)))
    typed = OmegaConf.merge(OmegaConf.structured(GridConfig), raw)
    OmegaConf.set_struct(typed, True)
    return GridSpec(name, raw, typed, cells, label, pipelines)


def _registry() -> Any:  # doctest helper
    from vtprune.framework.registry import build_registry

    return build_registry(autoload=False)
