"""Checking and coercing stage parameters against the type hints of the stage's ``__init__``."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

from .errors import ParameterError
from .stages import ParamSpec, stage_params

__all__ = ["coerce", "bind_params"]


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " | ".join(repr(choice) for choice in typing.get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Return ``value`` converted to ``annotation`` or raise `ParameterError` naming ``where``.

    Accepted: bool, int (not bool), float (ints widen), str, Literal choices, Optional/unions,
    tuple[X, ...] / list[X] (lists and tuples, stored as tuples), dict[K, V] (stored as a tuple
    of sorted (key, value) pairs, so stages stay hashable and recipes print canonically).
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        if value in args:
            return value
        raise ParameterError(f"{where} must be one of {_describe(annotation)}, got {value!r}")
    if origin in (Union, types.UnionType):
        errors = []
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return coerce(value, option, where)
            except ParameterError as error:
                errors.append(str(error))
        raise ParameterError(f"{where} must be {_describe(annotation)}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ParameterError(f"{where} must be a list, got {value!r}")
        item_type = args[0] if args else Any
        return tuple(coerce(item, item_type, f"{where}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        pairs = value.items() if isinstance(value, dict) else value
        try:
            items = [(coerce(k, args[0], f"{where} key"), coerce(v, args[1], f"{where}[{k!r}]")) for k, v in pairs]
        except (TypeError, ValueError) as error:
            if isinstance(error, ParameterError):
                raise
            raise ParameterError(f"{where} must be a mapping, got {value!r}") from None
        return tuple(sorted(items))
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif isinstance(annotation, type) and isinstance(value, annotation):
        return value
    raise ParameterError(f"{where} must be {_describe(annotation)}, got {value!r} ({type(value).__name__})")


def bind_params(cls: type, given: dict[str, Any], label: str) -> dict[str, Any]:
    """Validate ``given`` against the parameters of stage ``cls``; return them coerced.

    Raises `ParameterError` listing the valid parameters for an unknown name.
    """
    specs: dict[str, ParamSpec] = {spec.name: spec for spec in stage_params(cls)}
    bound = {}
    for key, value in given.items():
        if key not in specs:
            valid = ", ".join(f"{s.name}: {_describe(s.annotation)} = {s.default!r}" for s in specs.values())
            raise ParameterError(
                f"{label} has no parameter {key!r}; valid parameters: {valid or 'none'}"
            )
        bound[key] = coerce(value, specs[key].annotation, f"{label} parameter {key!r}")
    return bound


def describe_annotation(annotation: Any) -> str:
    """Human-readable type of a parameter (used by the catalog)."""
    return _describe(annotation)
