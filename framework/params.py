"""Binding stage parameters: the type hints of a stage's ``__init__`` checked and coerced.

The type walking itself (`coerce`, `describe_annotation`) lives in `vtprune.framework.typecheck`,
shared with the grid-file validation of `vtprune.experiments`; both names are re-exported here.
"""

from __future__ import annotations

from typing import Any

from .errors import ParameterError
from .stages import ParamSpec, stage_params
from .typecheck import coerce, describe_annotation

__all__ = ["coerce", "bind_params", "describe_annotation"]


def bind_params(cls: type, given: dict[str, Any], label: str) -> dict[str, Any]:
    """Validate ``given`` against the parameters of stage ``cls``; return them coerced.

    Raises `ParameterError` listing the valid parameters for an unknown name.
    """
    specs: dict[str, ParamSpec] = {spec.name: spec for spec in stage_params(cls)}
    bound = {}
    for key, value in given.items():
        if key not in specs:
            valid = ", ".join(f"{s.name}: {describe_annotation(s.annotation)} = {s.default!r}" for s in specs.values())
            raise ParameterError(f"{label} has no parameter {key!r}; valid parameters: {valid or 'none'}")
        bound[key] = coerce(value, specs[key].annotation, f"{label} parameter {key!r}")
    return bound
