"""Grid files: loading (safe YAML, ``defaults:`` / ``extends:``), overrides, validation, expansion.

>>> spec = load_grid({"base": {"model": {"name": "dummy"}, "task": {"name": "synthetic"}},
...                   "grid": {"budget": [8, 16]}, "baseline": False}, registry=_registry())
>>> [cell.assignment for cell in spec.cells]
[{'budget': 8}, {'budget': 16}]

Everything is checked before any model loads, and every problem is reported at once in one
`ConfigError` with the key path of each (``base.task.name``, ``grid.budget[2]``,
``include[0].method.recipe``). YAML is read with ``yaml.safe_load``; OmegaConf resolves
``${...}`` interpolations with its built-in resolvers only (vtprune registers none), so nothing in
a config runs code.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import itertools
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import yaml

from vtprune.framework.errors import VtpruneError, nearest

from .schema import NOT_HASHED, GridConfig, RunConfig

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
    "CONFIG_DIR",
]

#: The shipped example grids (``extends: NAME`` finds ``NAME.yaml`` here as well).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_GRID_KEYS = tuple(f.name for f in dataclasses.fields(GridConfig))


class ConfigError(VtpruneError):
    """Every problem of a grid file, each prefixed with its key path."""

    def __init__(self, problems: Sequence[str], source: str = "the config") -> None:
        self.problems = list(dict.fromkeys(problems))
        count = len(self.problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} in {source}:\n{lines}")


# ------------------------------------------------------------------------------------------------
# Files and overrides
# ------------------------------------------------------------------------------------------------


def read_config_file(path: Union[str, Path], _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A grid file as a plain dict, with its ``defaults:`` / ``extends:`` files merged underneath.

    ``defaults: [a.yaml, b.yaml]`` or ``extends: a.yaml``: paths relative to this file (or the name
    of a shipped config); later files and finally this file win; mappings merge key by key, any
    other value (lists included) is replaced.
    """
    path = _find_file(path, Path.cwd())
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError([f"defaults: circular composition {chain}"], str(path))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError([f"<yaml>: {error}"], str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError([f"<root>: a grid file is a mapping, got {type(data).__name__}"], str(path))
    parents: list[Any] = []
    for key in ("defaults", "extends"):
        value = data.pop(key, None)
        if value is None:
            continue
        parents.extend(value if isinstance(value, list) else [value])
    merged: dict[str, Any] = {}
    for parent in parents:
        if not isinstance(parent, str):
            raise ConfigError([f"defaults: entries are file names, got {parent!r}"], str(path))
        try:
            found = _find_file(parent, path.parent)
        except FileNotFoundError as error:
            raise ConfigError([f"defaults: {error}"], str(path)) from None
        merged = deep_merge(merged, read_config_file(found, (*_seen, path)))
    return deep_merge(merged, data)


def _find_file(name: Union[str, Path], relative_to: Path) -> Path:
    candidates = [Path(name)] if Path(name).is_absolute() else [relative_to / name, Path(name)]
    stem = Path(name).name
    candidates += [CONFIG_DIR / stem, CONFIG_DIR / f"{stem}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"no config file {str(name)!r} (looked next to {relative_to} and in {CONFIG_DIR})")


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: mappings merge recursively, anything else is replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_overrides(items: Sequence[str]) -> list[tuple[str, Any]]:
    """``["base.budget=32", "grid.budget=[16,32]"]`` -> ``[(key, value)]``; values read as YAML."""
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"override {item!r}: write key=value (e.g. budget=32 or grid.budget=[16,32])"], "the command line")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        out.append((key.strip(), value))
    return out


def apply_overrides(raw: dict[str, Any], overrides: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to a grid dict.

    A key whose first part is a grid-file key (``base``, ``grid``, ``seeds``, ``launcher``, ...) is set
    as written. Any other key is a run key: if it is a grid axis, the override replaces the axis
    values (a list gives several values); otherwise it sets ``base.<key>``.
    """
    raw = copy.deepcopy(raw)
    for key, value in overrides:
        head = key.split(".", 1)[0]
        if head == "grid" and "." in key:  # axis names contain dots: grid.<dotted axis>=[values]
            raw["grid"] = dict(raw.get("grid") or {})
            raw["grid"][key[5:]] = value if isinstance(value, list) else [value]
        elif head in _GRID_KEYS:
            set_dotted(raw, key, value)
        elif key in (raw.get("grid") or {}):
            raw["grid"][key] = value if isinstance(value, list) else [value]
        else:
            set_dotted(raw, f"base.{key}", value)
    return raw


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``key == "a.b.c"``, creating mappings on the way."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = copy.deepcopy(value)


def get_dotted(data: Mapping[str, Any], key: str, default: Any = None) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


# ------------------------------------------------------------------------------------------------
# Type checking against the schema
# ------------------------------------------------------------------------------------------------


def _describe(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return "anything"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]) if args else 'values'}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(annotation):
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


def check_value(value: Any, annotation: Any, path: str, problems: list[str]) -> None:
    """Append to ``problems`` every place where ``value`` does not fit ``annotation``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return
    if dataclasses.is_dataclass(annotation):
        check_mapping(annotation, value, path, problems)
        return
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return
        options = [a for a in args if a is not type(None)]
        trials = []
        for option in options:
            found: list[str] = []
            check_value(value, option, path, found)
            if not found:
                return
            trials.append(found)
        if len(options) == 1 or (isinstance(value, Mapping) and any(dataclasses.is_dataclass(o) for o in options)):
            problems.extend(trials[0])
        else:
            problems.append(f"{path}: expected {_describe(annotation)}, got {value!r}")
        return
    if origin is Literal:
        if value not in args:
            hint = nearest(str(value), [str(a) for a in args])
            problems.append(
                f"{path}: expected {_describe(annotation)}, got {value!r}" + (f" (did you mean {hint!r}?)" if hint else "")
            )
        return
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected {_describe(annotation)}, got {value!r}")
            return
        for index, item in enumerate(value):
            check_value(item, args[0] if args else Any, f"{path}[{index}]", problems)
        return
    if origin is dict:
        if not isinstance(value, Mapping):
            problems.append(f"{path}: expected a mapping, got {value!r}")
            return
        for key, item in value.items():
            if not isinstance(key, str):
                problems.append(f"{path}: keys must be strings, got {key!r}")
            check_value(item, args[1] if args else Any, f"{path}.{key}", problems)
        return
    if annotation is bool:
        ok = isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif annotation is str:
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, annotation)
    if not ok:
        problems.append(f"{path}: expected {_describe(annotation)}, got {value!r} ({type(value).__name__})")


def check_mapping(cls: type, data: Any, path: str, problems: list[str]) -> None:
    """Check a mapping against dataclass ``cls``: unknown keys (with the valid ones) and types."""
    if not isinstance(data, Mapping):
        problems.append(f"{path or '<root>'}: expected a mapping, got {data!r}")
        return
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in hints:
            hint = nearest(str(key), hints)
            problems.append(
                f"{where}: unknown key" + (f" (did you mean {hint!r}?)" if hint else "") + f"; valid keys: {', '.join(hints)}"
            )
            continue
        check_value(value, hints[key], where, problems)


def type_at(cls: type, dotted: str) -> Any:
    """The schema type of ``dotted`` under dataclass ``cls``; `KeyError` naming the bad part."""
    annotation: Any = cls
    walked = []
    for part in dotted.split("."):
        annotation = _unwrap_optional(annotation)
        if dataclasses.is_dataclass(annotation):
            hints = typing.get_type_hints(annotation)
            if part not in hints:
                hint = nearest(part, hints)
                where = ".".join(walked) or "the run"
                raise KeyError(
                    f"{where} has no key {part!r}" + (f" (did you mean {hint!r}?)" if hint else "") + f"; valid keys: {', '.join(hints)}"
                )
            annotation = hints[part]
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
        elif annotation is Any:
            return Any
        else:
            raise KeyError(f"{'.'.join(walked)} is a {_describe(annotation)}, it has no key {part!r}")
        walked.append(part)
    return annotation


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return annotation


# ------------------------------------------------------------------------------------------------
# Cells
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One run of a grid.

    Attributes:
        key: 12 hex digits of the SHA-256 of the resolved config (tracking and output_dir excluded).
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


def cell_key(config: Mapping[str, Any]) -> str:
    """The hash that names a cell's results (resolved config minus `NOT_HASHED` keys)."""
    view = {k: v for k, v in config.items() if k not in NOT_HASHED}
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
    drafts: list[tuple[dict, dict, dict]] = []
    for combo in itertools.product(*[list(enumerate(values)) for _, values in axes]):
        if any(isinstance(value, _Dropped) for _, value in combo):
            continue
        assignment = {key: value for (key, _), (_, value) in zip(axes, combo)}
        origins = {key: f"grid.{key}[{index}]" for (key, _), (index, _) in zip(axes, combo)}
        drafts.append((assignment, origins, {}))
    for index, extra in enumerate(raw.get("include") or []):
        if isinstance(extra, _Dropped):
            continue
        drafts.append((dict(extra), {key: f"include[{index}].{key}" for key in extra}, {}))
    seeds = raw.get("seeds")
    cells: dict[str, Cell] = {}
    baselines: dict[str, Cell] = {}
    for assignment, origins, _ in drafts:
        config = copy.deepcopy(dict(base))
        for key, value in assignment.items():
            set_dotted(config, key, value)
        resolved = _resolved_run(config)
        for seed in seeds if seeds is not None else [None]:
            run = copy.deepcopy(resolved)
            cell_assignment = dict(assignment)
            if seed is not None:
                run["seed"] = seed
                cell_assignment["seed"] = seed
            if any(_matches(run, entry) for entry in raw.get("exclude") or []):
                continue
            if run.get("method") is None:
                run = baseline_config(run)
            key = cell_key(run)
            base_run = baseline_config(run)
            bkey = cell_key(base_run)
            if run.get("method") is None:
                baselines.setdefault(key, Cell(key, run, cell_assignment, origins, name, None))
                continue
            if raw.get("baseline", True) and bkey not in baselines:
                baselines[bkey] = Cell(bkey, base_run, {}, {}, name, None)
            cells.setdefault(key, Cell(key, run, cell_assignment, origins, name, bkey))
    return [*baselines.values(), *cells.values()]


def _matches(config: Mapping[str, Any], entry: Mapping[str, Any]) -> bool:
    return all(get_dotted(config, key, _MISSING) == value for key, value in entry.items())


_MISSING = object()


# ------------------------------------------------------------------------------------------------
# Loading and validation
# ------------------------------------------------------------------------------------------------


@dataclass
class GridSpec:
    """A validated grid: its name, plain config, typed OmegaConf config and cells."""

    name: str
    raw: dict[str, Any]
    config: Any
    cells: list[Cell]
    source: str = ""

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
    problems: list[str] = []
    check_mapping(GridConfig, raw, "", problems)
    problems += _check_axes(raw)
    name = raw.get("name") if isinstance(raw.get("name"), str) and raw.get("name") else (name or "grid")
    if problems:
        # Still check what can be checked (recipes, tasks, budgets) without the ill-typed parts,
        # so that one error lists every problem.
        try:
            clean = _without(raw, [p.split(": ", 1)[0] for p in problems])
            problems += validate_cells(expand(clean, name), registry, check_models=check_models)
        except Exception:  # noqa: BLE001 - the structural problems are reported either way
            pass
        raise ConfigError(problems, label)
    raw["name"] = name
    cells = expand(raw, name)
    if not cells:
        problems.append("grid: every cell is excluded; nothing to run")
    problems += validate_cells(cells, registry, check_models=check_models)
    launcher = (raw.get("launcher") or {}).get("name", "local")
    if launcher not in registry.launchers:
        hint = nearest(launcher, registry.launchers)
        problems.append(
            f"launcher.name: unknown launcher {launcher!r}" + (f" (did you mean {hint!r}?)" if hint else "")
            + f"; valid: {', '.join(sorted(registry.launchers))}"
        )
    if problems:
        raise ConfigError(problems, label)
    typed = OmegaConf.merge(OmegaConf.structured(GridConfig), raw)
    OmegaConf.set_struct(typed, True)
    return GridSpec(name, raw, typed, cells, label)


_INDEX = re.compile(r"^(.*)\[(\d+)\]$")


def _without(raw: Mapping[str, Any], paths: Sequence[str]) -> dict[str, Any]:
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
                parent[last] = _DROPPED  # keeps the other items' indices (they name key paths)
            else:
                del parent[last]
        except (KeyError, IndexError, TypeError):
            pass
    return out


class _Dropped:
    """Marks a list item left out of a best-effort check (see `_without`)."""

    def __deepcopy__(self, memo: Any) -> "_Dropped":
        return self


_DROPPED = _Dropped()


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
        if not values:
            problems.append(f"grid.{key}: an axis needs at least one value")
        for index, value in enumerate(values or []):
            check_value(value, annotation, f"grid.{key}[{index}]", problems)
    for section in ("include", "exclude"):
        for index, entry in enumerate(raw.get(section) or []):
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


def validate_cells(cells: Sequence[Cell], registry: Any, check_models: bool = True) -> list[str]:
    """Semantic checks of every cell: task name and options, budget, recipe (via ``compose``), and
    whether the model's adapter supports the placement and provides the signals its stages need."""
    from vtprune.framework.budget import validate_budget

    from .tasks import check_task_options

    problems = _Problems()
    adapters: dict[str, Any] = {}
    for cell in cells:
        run = cell.config
        task = run["task"]
        if task["name"] not in registry.tasks:
            hint = nearest(task["name"], registry.tasks)
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
            validate_budget(run["budget"])
        except VtpruneError as error:
            problems.add(_origin(cell, "budget"), str(error), cell)
            continue
        try:
            pipeline = build_pipeline(run, registry)
        except (VtpruneError, TypeError, ValueError) as error:
            problems.add(_origin(cell, "method", "placement"), str(error), cell)
            continue
        if check_models:
            model_key = json.dumps(run["model"], sort_keys=True, default=str)
            if model_key not in adapters:
                adapters[model_key] = _adapter_info(run["model"], registry)
            info = adapters[model_key]
            if isinstance(info, str):
                problems.add(_origin(cell, "model"), info, cell)
            elif info is not None:
                for message in _check_adapter(pipeline, run, *info):
                    problems.add(_origin(cell, "method", "placement", "model"), message, cell)
    return problems.lines()


def _adapter_info(model: Mapping[str, Any], registry: Any) -> Any:
    """(adapter class or None, text config or None) for a model, from config files only; a string
    describes a problem; None when the model's config is not available offline (checked at run)."""
    from .models import describe_model

    try:
        return describe_model(model, registry)
    except VtpruneError as error:
        return str(error)


def _check_adapter(pipeline: Any, run: Mapping[str, Any], adapter: Any, text_config: Any) -> list[str]:
    problems = []
    placement = pipeline.placement.name
    if adapter is not None:
        if placement not in adapter.placements:
            problems.append(
                f"the {adapter.name!r} adapter of model {run['model']['name']!r} does not implement placement "
                f"{placement!r}; it implements {', '.join(sorted(adapter.placements))}"
            )
        else:
            missing = sorted(set(pipeline.requires) - set(adapter.provides(placement)))
            if missing:
                users = sorted({s.name for s in pipeline.stages if s.requires & set(missing)})
                problems.append(
                    f"stage(s) {', '.join(users)} need signal(s) {', '.join(missing)}, which the {adapter.name!r} "
                    f"adapter cannot provide at placement {placement!r} (it provides {', '.join(sorted(adapter.provides(placement)))})"
                )
    if text_config is not None:
        from .cost import text_config as language_config

        layers = int(language_config(text_config).num_hidden_layers)
        for drop in pipeline.placement.drops(run["budget"]):
            if drop.where == "layer" and not 1 <= int(drop.layer) < layers:
                problems.append(
                    f"placement {placement!r} drops before layer {drop.layer}, but the language model of "
                    f"{run['model']['name']!r} has {layers} layers (valid: 1..{layers - 1})"
                )
    return problems


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


def _params(stage: Any) -> Sequence[Any]:
    from vtprune.framework.stages import stage_params

    return stage_params(type(stage))


def _registry() -> Any:  # doctest helper
    from vtprune.framework.registry import build_registry

    return build_registry(autoload=False)


def signature_problem(factory: Any, options: Mapping[str, Any]) -> Optional[str]:
    """A sentence when ``factory(**options)`` would not bind, else None."""
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as error:
        params = [p for p in inspect.signature(factory).parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        valid = ", ".join(p.name + ("" if p.default is inspect.Parameter.empty else f"={p.default!r}") for p in params)
        return f"{error}; options: {valid or 'none'}"
    return None
