"""The one type walker: values against type hints, for stage parameters and grid files alike.

`walk` compares a value with an annotation (``bool``, ``int``, ``float``, ``str``, ``Literal``,
``Optional`` / unions, ``list[X]`` / ``tuple[X, ...]``, ``dict[K, V]``, dataclasses as mappings of
their fields, ``Any``) and returns every `Mismatch` at once. Two callers render them:

- `coerce` (stage parameters, `vtprune.framework.compose`): converts the value (lists to tuples,
  mappings to sorted ``(key, value)`` pairs, ints widened to float) and raises `ParameterError`
  for the first mismatch: ``"<where> must be int, got 1.5 (float)"``;
- `check_value` / `check_mapping` (grid files, `vtprune.experiments.validation`): append one line
  per mismatch with its key path: ``"base.seed: expected int, got 'one' (str)"``.

Also here, because both layers need them without importing upwards: `type_at` (the type of a
dotted key under a dataclass), `unwrap_optional` and `signature_problem` (would ``factory(**options)``
bind?).

>>> coerce([1, 2], tuple[float, ...], "ratios")
(1.0, 2.0)
>>> problems = []
>>> check_value([1, "x"], list[int], "grid.budget", problems)
>>> problems
["grid.budget[1]: expected int, got 'x' (str)"]
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import difflib

from .errors import ParameterError

__all__ = [
    "close_match",
    "KEY_HINT_CUTOFF",
    "Mismatch",
    "walk",
    "coerce",
    "check_value",
    "check_mapping",
    "describe_annotation",
    "describe_type",
    "type_at",
    "unwrap_optional",
    "signature_problem",
]

#: A path part that names a mapping's key itself (not the value under it).
KEY = object()

PathPart = Union[str, int, object]


@dataclass(frozen=True)
class Mismatch:
    """One place where a value does not fit its annotation.

    Attributes:
        path: the root label, then mapping keys (str), list indices (int) or `KEY`.
        kind: ``"type"`` (wrong scalar type), ``"choice"`` (not a Literal choice), ``"union"`` (no
            option fits), ``"list"`` (not a list), ``"mapping"`` (not a mapping) or ``"unknown_key"``.
        annotation: the type that was expected (for ``unknown_key``: the dataclass).
        value: the value found (for ``unknown_key``: the key).
        inner: for ``union``, the mismatches of the first option tried.
        hint: the nearest valid choice or key, if any is close.
        valid: for ``unknown_key``, the valid keys.
    """

    path: tuple[PathPart, ...]
    kind: str
    annotation: Any
    value: Any
    inner: tuple["Mismatch", ...] = ()
    hint: Optional[str] = None
    valid: tuple[str, ...] = ()


def walk(value: Any, annotation: Any, path: tuple[PathPart, ...] = ("",), convert: bool = False) -> tuple[Any, list[Mismatch]]:
    """``(value, mismatches)``: ``value`` checked against ``annotation``; with ``convert`` the value
    comes back converted (tuples for lists, sorted pairs for mappings, floats for ints where a float
    is expected; a mapping may then also be given as ``(key, value)`` pairs)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value, []
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if isinstance(value, annotation):
            return value, []
        return value, _walk_fields(annotation, value, path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None, []
        first: list[Mismatch] = []
        for option in [a for a in args if a is not type(None)]:
            converted, found = walk(value, option, path, convert)
            if not found:
                return converted, []
            first = first or found
        return value, [Mismatch(path, "union", annotation, value, tuple(first))]
    if origin is Literal:
        if value in args:
            return value, []
        hint = close_match(str(value), [str(a) for a in args])
        return value, [Mismatch(path, "choice", annotation, value, hint=hint)]
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return value, [Mismatch(path, "list", annotation, value)]
        item_type = args[0] if args else Any
        items, problems = [], []
        for index, item in enumerate(value):
            converted, found = walk(item, item_type, (*path, index), convert)
            items.append(converted)
            problems += found
        return (tuple(items) if convert else value), problems
    if origin is dict:
        return _walk_dict(value, args, path, convert)
    if _scalar_fits(value, annotation):
        return (float(value) if convert and annotation is float else value), []
    return value, [Mismatch(path, "type", annotation, value)]


def _scalar_fits(value: Any, annotation: Any) -> bool:
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return isinstance(annotation, type) and isinstance(value, annotation)


def _walk_dict(value: Any, args: tuple[Any, ...], path: tuple[PathPart, ...], convert: bool) -> tuple[Any, list[Mismatch]]:
    key_type, item_type = (args[0], args[1]) if args else (Any, Any)
    not_mapping = [Mismatch(path, "mapping", dict, value)]
    if not isinstance(value, Mapping) and not convert:
        return value, not_mapping
    problems: list[Mismatch] = []
    items = []
    try:
        for key, item in value.items() if isinstance(value, Mapping) else value:
            new_key, found = walk(key, key_type, (*path, KEY), convert)
            problems += found
            new_item, found = walk(item, item_type, (*path, key), convert)
            problems += found
            items.append((new_key, new_item))
        return (tuple(sorted(items)) if convert else value), problems
    except (TypeError, ValueError):  # not iterable as (key, value) pairs, or keys not comparable
        return value, problems or not_mapping


KEY_HINT_CUTOFF = 0.6
"""How alike (difflib ratio) an unknown key must be to a valid one to be suggested: ``dtyp`` ->
``dtype`` (0.89), ``gird`` -> ``grid`` (0.75); ``pruning`` -> ``tracking`` (0.53) is not suggested."""


def close_match(name: str, choices: Any) -> Optional[str]:
    """The valid key or name closest to ``name`` when it is close (`KEY_HINT_CUTOFF`), else None."""
    matches = difflib.get_close_matches(name, sorted(str(c) for c in choices), n=1, cutoff=KEY_HINT_CUTOFF)
    return matches[0] if matches else None


def _walk_fields(cls: type, data: Any, path: tuple[PathPart, ...]) -> list[Mismatch]:
    if not isinstance(data, Mapping):
        return [Mismatch(path, "mapping", cls, data)]
    hints = typing.get_type_hints(cls)
    problems: list[Mismatch] = []
    for key, value in data.items():
        where = (*path, key)
        if key not in hints:
            problems.append(Mismatch(where, "unknown_key", cls, key, hint=close_match(str(key), hints), valid=tuple(hints)))
            continue
        problems += walk(value, hints[key], where)[1]
    return problems


# -- describing types ------------------------------------------------------------------------------


def describe_annotation(annotation: Any) -> str:
    """Short type of a stage parameter (catalog, parameter errors): ``'mean' | 'max'``, ``int``."""
    if typing.get_origin(annotation) is Literal:
        return " | ".join(repr(choice) for choice in typing.get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def describe_type(annotation: Any) -> str:
    """The type in words (grid-file errors): ``one of 'keep', 'compact'``, ``int or float``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return "anything"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe_type(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {describe_type(args[0]) if args else 'values'}"
    if origin is dict or dataclasses.is_dataclass(annotation):
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


# -- rendering: stage parameters -------------------------------------------------------------------


def _parameter_where(path: tuple[PathPart, ...]) -> str:
    text = str(path[0])
    for part in path[1:]:
        text += " key" if part is KEY else f"[{part!r}]" if isinstance(part, str) else f"[{part}]"
    return text


def parameter_message(mismatch: Mismatch) -> str:
    """A mismatch as a stage-parameter error: ``"<where> must be <type>, got <value>"``."""
    where, value, annotation = _parameter_where(mismatch.path), mismatch.value, mismatch.annotation
    if mismatch.kind == "choice":
        return f"{where} must be one of {describe_annotation(annotation)}, got {value!r}"
    if mismatch.kind == "union":
        return f"{where} must be {describe_annotation(annotation)}, got {value!r}"
    if mismatch.kind == "list":
        return f"{where} must be a list, got {value!r}"
    if mismatch.kind == "mapping":
        return f"{where} must be a mapping, got {value!r}"
    if mismatch.kind == "unknown_key":
        return f"{where}: unknown key; valid keys: {', '.join(mismatch.valid)}"
    return f"{where} must be {describe_annotation(annotation)}, got {value!r} ({type(value).__name__})"


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Return ``value`` converted to ``annotation`` or raise `ParameterError` naming ``where``.

    Accepted: bool, int (not bool), float (ints widen), str, Literal choices, Optional/unions,
    tuple[X, ...] / list[X] (lists and tuples, stored as tuples), dict[K, V] (stored as a tuple
    of sorted (key, value) pairs, so stages stay hashable and recipes print canonically).
    """
    converted, problems = walk(value, annotation, (where,), convert=True)
    if problems:
        raise ParameterError(parameter_message(problems[0]))
    return converted


# -- rendering: grid files -------------------------------------------------------------------------


def _config_where(path: tuple[PathPart, ...]) -> str:
    text = str(path[0])
    for part in path[1:]:
        if part is KEY:
            continue
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def config_messages(mismatch: Mismatch) -> list[str]:
    """A mismatch as grid-file problem lines, each ``"<key path>: <problem>"``."""
    where, value, annotation = _config_where(mismatch.path), mismatch.value, mismatch.annotation
    if mismatch.path[-1] is KEY:
        return [f"{where}: keys must be strings, got {value!r}"]
    if mismatch.kind == "union":
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        mapping_for_dataclass = isinstance(value, Mapping) and any(dataclasses.is_dataclass(o) for o in options)
        if len(options) == 1 or mapping_for_dataclass:
            return [line for inner in mismatch.inner for line in config_messages(inner)]
        return [f"{where}: expected {describe_type(annotation)}, got {value!r}"]
    if mismatch.kind == "choice":
        hint = f" (did you mean {mismatch.hint!r}?)" if mismatch.hint else ""
        return [f"{where}: expected {describe_type(annotation)}, got {value!r}{hint}"]
    if mismatch.kind == "list":
        return [f"{where}: expected {describe_type(annotation)}, got {value!r}"]
    if mismatch.kind == "mapping":
        return [f"{where or '<root>'}: expected a mapping, got {value!r}"]
    if mismatch.kind == "unknown_key":
        hint = f" (did you mean {mismatch.hint!r}?)" if mismatch.hint else ""
        return [f"{where}: unknown key{hint}; valid keys: {', '.join(mismatch.valid)}"]
    return [f"{where}: expected {describe_type(annotation)}, got {value!r} ({type(value).__name__})"]


def check_value(value: Any, annotation: Any, path: str, problems: list[str]) -> None:
    """Append to ``problems`` every place where ``value`` does not fit ``annotation``."""
    for mismatch in walk(value, annotation, (path,))[1]:
        problems += config_messages(mismatch)


def check_mapping(cls: type, data: Any, path: str, problems: list[str]) -> None:
    """Check a mapping against dataclass ``cls``: unknown keys (with the valid ones) and types."""
    for mismatch in _walk_fields(cls, data, (path,)):
        problems += config_messages(mismatch)


# -- dotted keys and signatures --------------------------------------------------------------------


def unwrap_optional(annotation: Any) -> Any:
    """``X`` for ``Optional[X]``; any other annotation unchanged."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return annotation


def type_at(cls: type, dotted: str) -> Any:
    """The type of ``dotted`` under dataclass ``cls``; `KeyError` naming the bad part."""
    annotation: Any = cls
    walked: list[str] = []
    for part in dotted.split("."):
        annotation = unwrap_optional(annotation)
        if dataclasses.is_dataclass(annotation):
            hints = typing.get_type_hints(annotation)
            if part not in hints:
                hint = close_match(part, hints)
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
            raise KeyError(f"{'.'.join(walked)} is a {describe_type(annotation)}, it has no key {part!r}")
        walked.append(part)
    return annotation


def signature_problem(factory: Any, options: Mapping[str, Any]) -> Optional[str]:
    """A sentence when ``factory(**options)`` would not bind (with the valid options), else None."""
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as error:
        params = [p for p in inspect.signature(factory).parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        valid = ", ".join(p.name + ("" if p.default is inspect.Parameter.empty else f"={p.default!r}") for p in params)
        return f"{error}; options: {valid or 'none'}"
    return None
