"""Expanding a grid into cells: the `Cell` record, its hash (`cell_key`), the unpruned baseline
of a run and the method's label in reports.

`expand` takes a type-checked grid dict (see `vtprune.experiments.validation`) and returns its
cells: the product of the ``grid`` axes minus ``exclude``, plus ``include``, times ``seeds``, plus
one unpruned baseline per (model, task, generation settings).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from .gridfiles import get_dotted, set_dotted
from .schema import NOT_HASHED, RunConfig

__all__ = ["Cell", "cell_key", "baseline_config", "method_label", "expand", "first_seed_only", "rekey", "DROPPED"]


@dataclass(frozen=True)
class Cell:
    """One run of a grid.

    Attributes:
        key: 12 hex digits of the SHA-256 of the resolved config (tracking and output_dir excluded)
            and, once `rekey` ran (`load_grid` does), of the canonical composed recipe.
        config: the resolved run config (plain dict, every default filled in).
        assignment: the axis / include values that define this cell (dotted key -> value).
        origins: dotted key -> where its value came from (``grid.budget[1]``, ``include[0].budget``).
        grid: the grid's name.
        baseline_key: the key of the unpruned run of the same model and task (None for a baseline).
    """

    key: str
    config: dict[str, Any]
    assignment: dict[str, Any]
    origins: dict[str, str] = field(default_factory=dict)
    grid: str = ""
    baseline_key: Optional[str] = None

    @property
    def is_baseline(self) -> bool:
        return self.config.get("method") is None

    @property
    def label(self) -> str:
        return method_label(self.config)

    def describe(self) -> str:
        """``budget=64 method.params.critical=0.3 seed=1`` (or ``unpruned``)."""
        if self.is_baseline:
            return f"unpruned ({self.config['task']['name']})"
        parts = [f"{k}={_short(v)}" for k, v in self.assignment.items()]
        return " ".join(parts) or self.label


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def cell_key(config: Mapping[str, Any], recipe: Optional[Mapping[str, Any]] = None) -> str:
    """The hash that names a cell's results: the resolved config minus `NOT_HASHED` keys, plus
    ``recipe``, the canonical composed recipe with every stage parameter resolved
    (`vtprune.experiments.pipelines.canonical_recipe`), so that a changed default changes the key."""
    view = {k: v for k, v in config.items() if k not in NOT_HASHED}
    if recipe is not None:
        # the recipe as written, its params and the placement override are all in the composed recipe
        method = {k: v for k, v in (config.get("method") or {}).items() if k not in ("recipe", "params")}
        view.update(method=method, placement=None, canonical_recipe=recipe)
    text = json.dumps(view, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def baseline_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The unpruned run for ``config``'s model, task and generation settings."""
    out = copy.deepcopy(dict(config))
    out.update(method=None, placement=None, budget=RunConfig.budget, positions="keep", seed=0)
    return out


def method_label(config: Mapping[str, Any]) -> str:
    """The method's name in reports: ``method.label``, else recipe[params]@placement."""
    method = config.get("method")
    if method is None:
        return "unpruned"
    if method.get("label"):
        return str(method["label"])
    recipe = method.get("recipe")
    text = recipe if isinstance(recipe, str) else ",".join(f"{k}={_short(v)}" for k, v in (recipe or {}).items())
    if method.get("params"):
        text += "[" + ",".join(f"{k}={_short(v)}" for k, v in method["params"].items()) + "]"
    if config.get("placement"):
        text += f"@{config['placement']}"
    return text


def _resolved_run(raw: Mapping[str, Any]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), raw)
    return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]


def expand(raw: Mapping[str, Any], name: str = "") -> list[Cell]:
    """Every cell of a (type-checked) grid dict: axes' product minus ``exclude``, plus ``include``,
    times ``seeds``, plus one unpruned baseline per (model, task) when ``baseline`` is true.
    Baselines come first; duplicates (same key) are kept once."""
    base = raw.get("base") or {}
    axes = list((raw.get("grid") or {}).items())
    drafts: list[tuple[dict, dict]] = []  # (assignment, key -> where it came from)
    for combo in itertools.product(*[list(enumerate(values)) for _, values in axes]):
        if any(isinstance(value, _Dropped) for _, value in combo):
            continue
        assignment = {key: value for (key, _), (_, value) in zip(axes, combo)}
        origins = {key: f"grid.{key}[{index}]" for (key, _), (index, _) in zip(axes, combo)}
        drafts.append((assignment, origins))
    for index, extra in enumerate(raw.get("include") or []):
        if isinstance(extra, _Dropped):
            continue
        drafts.append((dict(extra), {key: f"include[{index}].{key}" for key in extra}))
    seeds = raw.get("seeds")
    cells: dict[str, Cell] = {}
    baselines: dict[str, Cell] = {}
    for assignment, origins in drafts:
        config = copy.deepcopy(dict(base))
        for key, value in assignment.items():
            set_dotted(config, key, value)
        resolved = _resolved_run(config)
        for number, seed in enumerate(seeds if seeds is not None else [None]):
            run = copy.deepcopy(resolved)
            cell_assignment, cell_origins = dict(assignment), dict(origins)
            if seed is not None:
                run["seed"] = seed
                cell_assignment["seed"] = seed
                cell_origins["seed"] = f"seeds[{number}]"
            if any(_matches(run, entry) for entry in raw.get("exclude") or []):
                continue
            if run.get("method") is None:
                run = baseline_config(run)
            key = cell_key(run)
            base_run = baseline_config(run)
            bkey = cell_key(base_run)
            if run.get("method") is None:
                baselines.setdefault(key, Cell(key, run, cell_assignment, cell_origins, name, None))
                continue
            if raw.get("baseline", True) and bkey not in baselines:
                baselines[bkey] = Cell(bkey, base_run, {}, {}, name, None)
            cells.setdefault(key, Cell(key, run, cell_assignment, cell_origins, name, bkey))
    return [*baselines.values(), *cells.values()]


def first_seed_only(cells: list[Cell], stochastic: Callable[[Mapping[str, Any]], bool]) -> list[Cell]:
    """``cells`` without the repeats that ``seeds`` made of deterministic methods: a cell whose
    seed came from ``seeds[i > 0]`` is dropped unless ``stochastic(config)`` (its pipeline draws
    random numbers). Seeds set by an axis or an include entry are kept."""
    return [
        cell for cell in cells
        if cell.is_baseline or cell.origins.get("seed", "seeds[0]") == "seeds[0]"
        or not cell.origins["seed"].startswith("seeds[") or stochastic(cell.config)
    ]


def rekey(cells: list[Cell], recipe_of: Callable[[Mapping[str, Any]], Optional[Mapping[str, Any]]]) -> list[Cell]:
    """``cells`` keyed on their canonical composed recipes (``recipe_of(config)``; None for the
    unpruned run); cells whose recipes resolve to the same method are kept once."""
    out: dict[str, Cell] = {}
    for cell in cells:
        key = cell_key(cell.config, recipe_of(cell.config)) if not cell.is_baseline else cell.key
        if key not in out:
            out[key] = dataclasses.replace(cell, key=key)
    return list(out.values())


def _matches(config: Mapping[str, Any], entry: Mapping[str, Any]) -> bool:
    return all(get_dotted(config, key, _MISSING) == value for key, value in entry.items())


_MISSING = object()


class _Dropped:
    """Marks a list item left out of a best-effort check (`vtprune.experiments.validation`): `expand` skips it."""

    def __deepcopy__(self, memo: Any) -> "_Dropped":
        return self


DROPPED = _Dropped()
