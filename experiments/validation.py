"""Validating a grid before any model loads: the type check against the schema, the grid axes and
include / exclude entries, and every cell's task, budget, recipe and model.

Problems are lines ``"<key path>: <problem>"`` (``base.task.name``, ``grid.budget[2]``,
``include[0].method.recipe``); a problem shared by several cells is one line naming how many.
The type walking is `vtprune.framework.typecheck`'s (the one stage parameters use).
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any, Mapping, Optional, Sequence

from vtprune.framework.errors import VtpruneError
from vtprune.framework.typecheck import check_mapping, check_value, close_match, type_at

from .cells import DROPPED, Cell
from .pipelines import PipelineCache
from .schema import GridConfig, RunConfig
from .tasks import check_task_options

__all__ = [
    "check_grid",
    "validate_cells",
    "adapter_support_problems",
    "text_config_problems",
    "without",
    "method_problems",
    "range_problems",
]


def check_grid(raw: Mapping[str, Any]) -> list[str]:
    """Type problems of a grid dict (after composition and overrides): its keys and value types,
    the grid axes (each a run key with a list of values of that key's type) and include / exclude."""
    problems: list[str] = []
    check_mapping(GridConfig, raw, "", problems)
    axes = _check_axes(raw)
    # an axis that is not a list: the axis check's message (with the fix) replaces the type walker's
    explained = {line.split(": ", 1)[0] for line in axes}
    return [line for line in problems if line.split(": ", 1)[0] not in explained] + axes


_INDEX = re.compile(r"^(.*)\[(\d+)\]$")


def without(raw: Mapping[str, Any], paths: Sequence[str]) -> dict[str, Any]:
    """A copy of ``raw`` without the values at the problem paths (``base.model.dtyp``,
    ``grid.budget[2]``, ``include[0].x``); a problem inside a grid axis value drops that value."""
    out = copy.deepcopy(dict(raw))
    drops: list[tuple[Any, Any]] = []
    for path in paths:
        node: Any = out
        parent: Any = None
        last: Any = None
        for part in _split_path(path):
            if isinstance(node, Mapping) and part in node:
                parent, last, node = node, part, node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                parent, last, node = node, part, node[part]
            else:
                break
            if isinstance(parent, list):
                break  # drop the whole list item (an axis value or an include entry)
        if parent is not None:
            drops.append((parent, last))
    for parent, last in drops:
        try:
            if isinstance(parent, list):
                parent[last] = DROPPED  # keeps the other items' indices (they name key paths)
            else:
                del parent[last]
        except (KeyError, IndexError, TypeError):
            pass
    return out


def _split_path(path: str) -> list[Any]:
    parts: list[Any] = []
    if path.startswith("grid."):  # axis names contain dots: grid.<axis>[i]
        rest = path[5:]
        found = _INDEX.match(rest.split(" ")[0])
        return ["grid", found.group(1), int(found.group(2))] if found else ["grid", rest]
    for part in path.split("."):
        found = _INDEX.match(part)
        if found:
            parts += [found.group(1), int(found.group(2))]
        else:
            parts.append(part)
    return parts


def _check_axes(raw: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    for key, values in (raw.get("grid") or {}).items():
        try:
            annotation = type_at(RunConfig, key)
        except KeyError as error:
            problems.append(f"grid.{key}: {error.args[0]}")
            continue
        if not isinstance(values, list):
            problems.append(f"grid.{key}: an axis is a list of values, got {values!r}; write [{values!r}] for one value, or set base.{key}")
            continue
        if not values:
            problems.append(f"grid.{key}: an axis needs at least one value")
        for index, value in enumerate(values or []):
            check_value(value, annotation, f"grid.{key}[{index}]", problems)
    for section in ("include", "exclude"):
        entries = raw.get(section) or []
        if not isinstance(entries, list):
            problems.append(f"{section}: a list of {{dotted key: value}} entries, got {entries!r}")
            continue
        for index, entry in enumerate(entries):
            if not isinstance(entry, Mapping):
                problems.append(f"{section}[{index}]: an entry is a mapping {{dotted key: value}}, got {entry!r}")
                continue
            for key, value in entry.items():
                try:
                    annotation = type_at(RunConfig, key)
                except KeyError as error:
                    problems.append(f"{section}[{index}].{key}: {error.args[0]}")
                    continue
                if section == "include":
                    check_value(value, annotation, f"{section}[{index}].{key}", problems)
    return problems


def _origin(cell: Cell, *prefixes: str) -> str:
    """Where a cell's value for keys under ``prefixes`` came from: its grid axes / include entries,
    else ``base.<prefix>``."""
    found = [origin for key, origin in cell.origins.items() if key.split(".")[0] in prefixes]
    covered = {key.split(".")[0] for key in cell.origins}
    found += [f"base.{p}" for p in prefixes[1:] if p not in covered and cell.config.get(p) is not None and p != "model"]
    return ", ".join(found) if found else f"base.{prefixes[0]}"


class _Problems:
    """Cell problems grouped by (key path, message): one line each, naming how many cells."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], list[Cell]] = {}

    def add(self, where: str, message: str, cell: Cell) -> None:
        self.seen.setdefault((where, message.replace("\n", " ")), []).append(cell)

    def lines(self) -> list[str]:
        out = []
        for (where, message), cells in self.seen.items():
            scope = ""
            if "grid." in where or "include[" in where:
                scope = f" [cell {cells[0].describe()}" + (f" and {len(cells) - 1} more" if len(cells) > 1 else "") + "]"
            out.append(f"{where}: {message}{scope}")
        return out


#: What composing a method raises for a bad recipe, parameter or placement (reported, never propagated).
_COMPOSE_ERRORS = (VtpruneError, TypeError, ValueError)


def validate_cells(
    cells: Sequence[Cell], registry: Any, check_models: bool = True, pipelines: Optional[PipelineCache] = None
) -> list[str]:
    """Semantic checks of every cell: task name and options, budget, recipe (via ``compose``), and
    whether the model's adapter supports the placement and provides the signals its stages need.

    The pipelines come from ``pipelines`` (a cache of ``registry``; a new one when None), so the
    caller can run the cells with the pipelines validated here."""
    from vtprune.framework.budget import ZERO_BUDGET_HINT, validate_budget
    from vtprune.framework.stages import zero_budget_allowed

    pipelines = pipelines if pipelines is not None else PipelineCache(registry)
    problems = _Problems()
    adapters: dict[str, Any] = {}
    for cell in cells:
        run = cell.config
        for where, message in range_problems(cell):
            problems.add(where, message, cell)
        task = run["task"]
        if task["name"] not in registry.tasks:
            hint = close_match(task["name"], registry.tasks)
            problems.add(
                f"{_origin(cell, 'task')}",
                f"unknown task {task['name']!r}" + (f" (did you mean {hint!r}?)" if hint else "") + f"; valid tasks: {', '.join(sorted(registry.tasks))}",
                cell,
            )
        else:
            message = check_task_options(registry.task(task["name"]), task.get("options") or {})
            if message:
                problems.add(f"{_origin(cell, 'task')}", f"task {task['name']!r} options: {message}", cell)
        if cell.is_baseline:
            continue
        try:
            validate_budget(run["budget"], allow_zero=True)  # the count 0: checked against the placement below
        except VtpruneError as error:
            problems.add(_origin(cell, "budget"), str(error), cell)
            continue
        try:
            pipeline = pipelines.get(run)
        except _COMPOSE_ERRORS as error:
            for where, message in method_problems(cell, registry, error):
                problems.add(where, message, cell)
            continue
        if run["budget"] == 0 and not zero_budget_allowed(pipeline):  # only a withdrawing placement (VTW) takes 0
            problems.add(_origin(cell, "budget"), f"budget must be a positive token count, got 0 ({ZERO_BUDGET_HINT})", cell)
            continue
        if check_models and run["model"].get("name") is not None:
            model_key = json.dumps(run["model"], sort_keys=True, default=str)
            if model_key not in adapters:
                adapters[model_key] = _adapter_info(run["model"], registry)
            info = adapters[model_key]
            if isinstance(info, str):
                problems.add(_origin(cell, "model"), info, cell)
            elif info is not None:
                adapter, text_config = info
                messages = adapter_support_problems(pipeline, run, adapter) + text_config_problems(pipeline, run, text_config)
                for message in messages:
                    problems.add(_origin(cell, "method", "placement", "model"), message, cell)
    return problems.lines()


#: Run keys that must be at least a given value: (dotted key, minimum, what the key is).
_MINIMUMS: tuple[tuple[str, int, str], ...] = (
    ("generation.batch_size", 1, "samples per generate call"),
    ("generation.max_new_tokens", 1, "tokens generated per answer"),
    ("task.limit", 1, "the number of samples to run (null = all)"),
    ("tracking.log_images", 0, "overlays logged per cell"),
)


def range_problems(cell: Cell) -> list[tuple[str, str]]:
    """(key path, message) for a missing ``model.name`` and for counts below their minimum."""
    run = cell.config
    found = []
    if run["model"].get("name") is None:
        found.append((
            _origin_of(cell, "model.name"),
            "required: a Hugging Face hub id, a local directory, pkg:<package>/<dir>, or 'dummy' "
            "(the fake model, for dry runs)",
        ))
    for dotted, minimum, what in _MINIMUMS:
        section, key = dotted.split(".")
        value = (run.get(section) or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < minimum:
            found.append((_origin_of(cell, dotted), f"must be >= {minimum} ({what}), got {value}"))
    return found



def method_problems(cell: Cell, registry: Any, error: Exception) -> list[tuple[str, str]]:
    """(key path, message) for every problem of a cell's method that failed to compose with
    ``error``: the recipe on its own (at the recipe's key path), then each of ``method.params``
    with the recipe (at that parameter's key path, when its error is not the recipe's), then the
    placement override; ``error`` itself at the method's origin when no part fails alone."""
    from vtprune.framework.compose import compose

    from .pipelines import build_pipeline

    run = cell.config
    method = run["method"]
    found: list[tuple[str, str]] = []
    alone = _compose_error(lambda: compose(method["recipe"], registry=registry))
    if alone is not None:
        found.append((_origin_of(cell, "method.recipe"), alone))
    for name, value in (method.get("params") or {}).items():
        message = _compose_error(lambda: compose(method["recipe"], registry=registry, **{name: value}))
        if message is not None and message != alone:
            found.append((_origin_of(cell, f"method.params.{name}"), message))
    if not found and run.get("placement"):
        message = _compose_error(lambda: build_pipeline(run, registry))
        if message is not None:
            found.append((_origin_of(cell, "placement"), message))
    return found or [(_origin(cell, "method", "placement"), str(error))]


def _compose_error(build: Any) -> Optional[str]:
    try:
        build()
    except _COMPOSE_ERRORS as error:
        return str(error)
    return None


def _origin_of(cell: Cell, dotted: str) -> str:
    """Where a cell's value at ``dotted`` (``method.params.critical``) came from: the grid axis or
    include entry that set it or a key above it, else ``base.<dotted>``."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        origin = cell.origins.get(".".join(parts[:end]))
        if origin is not None:
            return origin + ("." + ".".join(parts[end:]) if end < len(parts) and "[" not in origin.rsplit(".", 1)[-1] else "")
    return f"base.{dotted}"


def _adapter_info(model: Mapping[str, Any], registry: Any) -> Any:
    """(adapter class or None, text config or None) for a model, from config files only; a string
    describes a problem; None when the model's config is not available offline (checked at run)."""
    from .models import describe_model

    try:
        return describe_model(model, registry)
    except VtpruneError as error:
        return str(error)


def adapter_support_problems(pipeline: Any, run: Mapping[str, Any], adapter: Any) -> list[str]:
    """Whether ``adapter`` (a class, or None when unknown) implements the pipeline's placement and
    provides the signals its stages need there: one message per problem of the one support check
    (`vtprune.framework.support.support_report`, what ``framework.prune`` raises), worded for a grid
    file (the model as configured, the stages that need a missing signal)."""
    if adapter is None:
        return []
    from vtprune.framework.errors import VtpruneError
    from vtprune.framework.support import PLACEMENT_REQUESTS, support_report

    model = run["model"]["name"]
    messages = []
    for problem in support_report(adapter, pipeline, model_name=f"model {model!r}"):
        requested = PLACEMENT_REQUESTS.get(problem.placement, frozenset())
        if problem.error is VtpruneError or (problem.missing and set(problem.missing) <= requested):
            messages.append(
                f"the {problem.adapter!r} adapter of model {model!r} does not implement placement "
                f"{problem.placement!r} ({problem.kind!r} drops{_missing(problem)}); it implements "
                f"{', '.join(problem.implemented)}"
            )
            continue
        users = sorted({s.name for s in pipeline.stages if s.requires & set(problem.missing)})
        messages.append(
            f"stage(s) {', '.join(users)} need signal(s) {', '.join(problem.missing)}, which the "
            f"{problem.adapter!r} adapter cannot provide at placement {problem.placement!r} (it provides "
            f"{', '.join(problem.provided)})"
        )
    return messages


def _missing(problem: Any) -> str:
    return f" need {', '.join(problem.missing)}, which it cannot provide" if problem.missing else ""


def text_config_problems(pipeline: Any, run: Mapping[str, Any], text_config: Any) -> list[str]:
    """Whether the placement's in-LLM drops fall inside the language model (layer 1 .. layers - 1);
    ``text_config`` is the model's config (None when unknown offline)."""
    if text_config is None:
        return []
    from .cost import text_config as language_config

    problems = []
    placement = pipeline.placement.name
    layers = int(language_config(text_config).num_hidden_layers)
    last = layers if getattr(pipeline.placement, "drops_after_last_layer", False) else layers - 1  # withdraw(k=layers)
    for drop in pipeline.placement.drops(run["budget"]):
        if drop.where == "layer" and not 1 <= int(drop.layer) <= last:
            problems.append(
                f"placement {placement!r} drops before layer {drop.layer}, but the language model of "
                f"{run['model']['name']!r} has {layers} layers (valid: 1..{last})"
            )
    return problems
