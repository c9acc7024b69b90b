"""The one type walker (`vtprune.framework.typecheck`): stage parameters (`compose`) and grid files
(`load_grid`) find the same mismatches at the same places, each in its own phrasing."""

from __future__ import annotations

import doctest
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import pytest

from vtprune.experiments.config import ConfigError, load_grid
from vtprune.framework import compose
from vtprune.framework.errors import ParameterError
from vtprune.framework.typecheck import check_mapping, check_value, coerce, signature_problem, type_at, walk

# (value, annotation, where in the value the problem is (None: it fits), parameter message, grid-file message)
CASES = [
    (1.5, int, "", "W must be int, got 1.5 (float)", "P: expected int, got 1.5 (float)"),
    ("median", Literal["mean", "max"], "", "W must be one of 'mean' | 'max', got 'median'",
     "P: expected one of 'mean', 'max', got 'median' (did you mean 'mean'?)"),
    ("x", Optional[int], "", "W must be Optional, got 'x'", "P: expected int, got 'x' (str)"),
    ([1, "x"], tuple[int, ...], "[1]", "W[1] must be int, got 'x' (str)", "P[1]: expected int, got 'x' (str)"),
    ({"a": "x"}, dict[str, int], "a", "W['a'] must be int, got 'x' (str)", "P.a: expected int, got 'x' (str)"),
    (3, list[int], "", "W must be a list, got 3", "P: expected a list of int, got 3"),
    (True, int, "", "W must be int, got True (bool)", "P: expected int, got True (bool)"),
    ("x", Union[int, float], "", "W must be Union, got 'x'", "P: expected int or float, got 'x'"),
    ({1: 2}, dict[str, int], "key", "W key must be str, got 1 (int)", "P: keys must be strings, got 1"),
    ({"k": [1, "z"]}, dict[str, list[float]], "k[1]", "W['k'][1] must be float, got 'z' (str)",
     "P.k[1]: expected float, got 'z' (str)"),
    ("abc", tuple[str, ...], "", "W must be a list, got 'abc'", "P: expected a list of str, got 'abc'"),
    (None, int, "", "W must be int, got None (NoneType)", "P: expected int, got None (NoneType)"),
    (2, float, None, None, None),
    (None, Optional[int], None, None, None),
    ([None, 1], tuple[Optional[float], ...], None, None, None),
]


@pytest.mark.parametrize("value, annotation, where, parameter_message, grid_message", CASES)
def test_coercion_and_grid_checks_agree(value: Any, annotation: Any, where: Any, parameter_message: Any, grid_message: Any) -> None:
    problems: list[str] = []
    check_value(value, annotation, "P", problems)
    if where is None:
        assert problems == []
        coerce(value, annotation, "W")  # fits: no error
        return
    assert problems == [grid_message]
    with pytest.raises(ParameterError) as caught:
        coerce(value, annotation, "W")
    assert str(caught.value) == parameter_message
    _, checked = walk(value, annotation, ("R",))
    _, converted = walk(value, annotation, ("R",), convert=True)
    assert [(m.path, m.kind) for m in checked] == [(m.path, m.kind) for m in converted]  # one walk, two phrasings


def test_coercion_converts_and_grid_check_keeps_values() -> None:
    assert coerce([1, 2], tuple[float, ...], "w") == (1.0, 2.0)
    assert coerce({"b": 2, "a": 1}, dict[str, int], "w") == (("a", 1), ("b", 2))
    assert coerce([("b", 2), ("a", 1)], dict[str, int], "w") == (("a", 1), ("b", 2))  # pairs are a mapping here
    problems: list[str] = []
    check_value([("a", 1)], dict[str, int], "options", problems)  # ... but not in a grid file
    assert problems == ["options: expected a mapping, got [('a', 1)]"]


def test_compose_and_load_grid_messages(registry) -> None:
    with pytest.raises(ParameterError) as caught:
        compose("prompt_cosine(pool=median)", registry=registry)
    assert str(caught.value) == (
        "relevance stage 'prompt_cosine' parameter 'pool' must be one of 'mean' | 'max' | 'token_max', got 'median'"
    )
    with pytest.raises(ParameterError) as caught:
        compose("kmeans(seed=1.5)", registry=registry)
    assert str(caught.value) == "diversity stage 'kmeans' parameter 'seed' must be int, got 1.5 (float)"
    base = {"model": {"name": "dummy"}, "task": {"name": "synthetic"}, "method": {"recipe": "zspaprune"}}
    with pytest.raises(ConfigError) as error:
        load_grid({"base": {**base, "positions": "kept", "seed": "one"}}, registry=registry)
    assert error.value.problems == [
        "base.positions: expected one of 'keep', 'compact', got 'kept' (did you mean 'keep'?)",
        "base.seed: expected int, got 'one' (str)",
    ]


@dataclass
class Inner:
    size: int = 1


@dataclass
class Outer:
    inner: Optional[Inner] = None
    tags: dict[str, float] = field(default_factory=dict)


def test_dataclass_mappings_keys_and_types() -> None:
    problems: list[str] = []
    check_mapping(Outer, {"inner": {"sise": 2}, "tags": {"a": "x"}, "tgs": 1}, "", problems)
    assert problems == [
        "inner.sise: unknown key (did you mean 'size'?); valid keys: size",
        "tags.a: expected float, got 'x' (str)",
        "tgs: unknown key (did you mean 'tags'?); valid keys: inner, tags",
    ]
    problems = []
    check_mapping(Outer, [1], "", problems)
    assert problems == ["<root>: expected a mapping, got [1]"]
    assert type_at(Outer, "inner.size") is int and type_at(Outer, "tags.x") is float
    with pytest.raises(KeyError, match="inner has no key 'sixe' \\(did you mean 'size'\\?\\); valid keys: size"):
        type_at(Outer, "inner.sixe")
    with pytest.raises(KeyError, match="inner.size is a int, it has no key 'x'"):
        type_at(Outer, "inner.size.x")


def test_signature_problem_names_the_valid_options() -> None:
    def factory(path: str, metric: str = "vqa") -> None: ...

    assert signature_problem(factory, {"path": "p"}) is None
    assert signature_problem(factory, {"path": "p", "metrc": "vqa"}) == (
        "got an unexpected keyword argument 'metrc'; options: path, metric='vqa'"
    )


def test_one_walker_behind_both_layers() -> None:
    import vtprune.experiments.validation as validation
    import vtprune.framework.params as params
    import vtprune.framework.typecheck as typecheck

    assert params.coerce is typecheck.coerce and params.describe_annotation is typecheck.describe_annotation
    assert validation.check_value is typecheck.check_value and validation.check_mapping is typecheck.check_mapping
    assert doctest.testmod(typecheck).failed == 0


@pytest.mark.parametrize("module", ["samples", "cells", "gridfiles", "validation", "pipelines"])
def test_new_modules_have_contract_docstrings(module: str) -> None:
    import importlib

    loaded = importlib.import_module(f"vtprune.experiments.{module}")
    assert loaded.__doc__ and loaded.__all__
    assert doctest.testmod(loaded).failed == 0
