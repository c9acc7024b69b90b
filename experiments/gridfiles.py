"""Reading grid files: safe YAML, ``defaults:`` / ``extends:`` composition, dotted overrides.

YAML is read with ``yaml.safe_load``, so nothing in a grid file runs code. Every problem is raised
as a `ConfigError` naming the file and the key.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import yaml

from vtprune.framework.errors import VtpruneError

from .schema import GridConfig

__all__ = [
    "ConfigError",
    "CONFIG_DIR",
    "read_config_file",
    "deep_merge",
    "parse_overrides",
    "apply_overrides",
    "set_dotted",
    "get_dotted",
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


def read_config_file(path: Union[str, Path], _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A grid file as a plain dict, with its ``defaults:`` / ``extends:`` files merged underneath.

    ``defaults: [a.yaml, b.yaml]`` or ``extends: a.yaml``: paths relative to this file (or the name
    of a shipped config); later files and finally this file win; mappings merge key by key, any
    other value (lists included) is replaced.
    """
    try:
        path = _find_file(path, Path.cwd())
    except FileNotFoundError as error:
        shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError([f"<file>: {error}; shipped grids: {shipped}"], str(path)) from None
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
    """``data[a][b][c]`` for ``key == "a.b.c"``, or ``default`` where a part is missing."""
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node
