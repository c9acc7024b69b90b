"""Meta-tests: every hook, stage and preset is documented and tested; docstring examples run."""

from __future__ import annotations

import doctest
import importlib
import inspect
import re
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
    "vtprune.experiments.gen_options",
]


@pytest.mark.parametrize("module", DOCTEST_MODULES)
def test_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


# -- docs that must agree with the code (issue 17, item 12) ----------------------------------------

_YAML_BLOCK = re.compile(r"```ya?ml\n(.*?)```", re.S)
#: Problems a docs example may have because it names data that only exists on the reader's machine.
_READER_DATA = ("no JSONL file at",)


def _yaml_examples() -> list[tuple[str, int, str]]:
    out = []
    for path in [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]:
        for number, found in enumerate(_YAML_BLOCK.finditer(path.read_text())):
            out.append((path.name, number, found.group(1)))
    return out


@pytest.mark.parametrize("name, number, text", _yaml_examples(), ids=lambda v: str(v)[:30])
def test_yaml_examples_in_the_docs_are_valid_grids(name: str, number: int, text: str, tmp_path) -> None:
    """Every YAML example is a grid file, or a part of one (grid-file keys, or run keys of ``base``)."""
    import dataclasses

    import yaml

    from vtprune.experiments.config import ConfigError, load_grid
    from vtprune.experiments.schema import GridConfig, RunConfig

    data = yaml.safe_load(text)
    grid_keys = {f.name for f in dataclasses.fields(GridConfig)} | {"extends", "defaults"}
    run_keys = {f.name for f in dataclasses.fields(RunConfig)}
    assert isinstance(data, dict), f"{name} YAML example {number} is not a mapping"
    if not set(data) <= grid_keys:
        assert set(data) <= run_keys, f"{name} YAML example {number}: keys {sorted(set(data) - grid_keys - run_keys)} are not grid-file or run keys"
        data = {"base": data}
    base = data.setdefault("base", {})
    base.setdefault("model", {"name": "dummy"})
    base.setdefault("task", {"name": "synthetic"})
    if "launcher" in data and set(data) == {"launcher", "base"}:  # a launcher snippet: only its keys matter here
        data["launcher"] = {"name": data["launcher"].get("name", "local")}
    path = tmp_path / "example.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        load_grid(path, registry=_REGISTRY, check_models=False)
    except ConfigError as error:
        problems = [p for p in error.problems if not any(marker in p for marker in _READER_DATA)]
        assert not problems, f"{name} YAML example {number}:\n" + "\n".join(problems)


def _methods_rows() -> dict[str, str]:
    """preset -> its "models (adapters)" cell in docs/methods.md's summary table."""
    lines = (DOCS / "methods.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| preset |"))
    column = [c.strip() for c in header.strip("|").split(" | ")].index("models (adapters)")
    rows = {}
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) > column and cells[0].startswith("`") and cells[0].strip("`") in _REGISTRY.presets:
            rows[cells[0].strip("`")] = cells[column]
    return rows


@pytest.mark.parametrize("preset", sorted(_REGISTRY.presets))
def test_the_methods_table_models_column_matches_the_registry(preset: str) -> None:
    from vtprune.framework import compose
    from vtprune.framework.support import support_report

    pipeline = compose(preset, registry=_REGISTRY)
    supported = [name for name in sorted(_REGISTRY.adapters) if not support_report(_REGISTRY.adapters[name].obj, pipeline)]
    expected = "all" if len(supported) == len(_REGISTRY.adapters) else ", ".join(supported)
    assert _methods_rows().get(preset) == expected, f"docs/methods.md: the models column of {preset} should read {expected!r}"


def test_the_readme_prune_example_passes_prompt_stop() -> None:
    """Without ``prompt_stop`` the assistant marker is part of the prompt, which changes the selection."""
    readme = (ROOT / "README.md").read_text()
    calls = re.findall(r"framework\.prune\(([^)]*)\)", readme)
    assert calls and all("prompt_stop=" in call for call in calls), calls
