"""Meta-tests: every hook, stage and preset is documented and tested; docstring examples run."""

from __future__ import annotations

import doctest
import importlib
import inspect
from pathlib import Path

import pytest

from vtprune.framework import build_registry, hookspecs

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TESTS = Path(__file__).resolve().parent
_REGISTRY = build_registry(autoload=False)
HOOKS = [name for name, value in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("vtprune_")]


def _tests_text() -> str:
    return "\n".join(path.read_text() for path in TESTS.rglob("*.py"))


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_and_tested(hook: str) -> None:
    function = getattr(hookspecs, hook)
    assert function.__doc__ and len(function.__doc__) > 80, f"{hook} needs a docstring contract"
    assert hook in (DOCS / "architecture.md").read_text(), f"{hook} is not in docs/architecture.md"
    assert hook in _tests_text().replace(f'"{hook}"', ""), f"no test implements or calls {hook}"


@pytest.mark.parametrize("preset", sorted(_REGISTRY.presets))
def test_every_preset_is_in_the_methods_table(preset: str) -> None:
    assert f"`{preset}`" in (DOCS / "methods.md").read_text(), f"preset {preset} missing from docs/methods.md"


@pytest.mark.parametrize("kind, name", [(k, n) for k, table in _REGISTRY.stages.items() for n in table])
def test_every_stage_is_documented(kind: str, name: str) -> None:
    text = "\n".join(path.read_text() for path in DOCS.glob("*.md")) + (ROOT / "README.md").read_text()
    assert f"`{name}" in text, f"{kind} stage {name} is not mentioned in README.md or docs/"


DOCTEST_MODULES = [
    "vtprune.framework",
    "vtprune.framework.budget",
    "vtprune.framework.recipe",
    "vtprune.framework.compose",
    "vtprune.strategies.functional.prompt_relevance",
    "vtprune.strategies.functional.ranking",
    "vtprune.adapters.spans",
    "vtprune.adapters.mrope",
    "vtprune.adapters.qwen2_vl",
    "vtprune.adapters.qwen3_vl",
]


@pytest.mark.parametrize("module", DOCTEST_MODULES)
def test_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
