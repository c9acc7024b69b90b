"""Grid files: validation (one error, every problem, key paths), expansion, overrides, composition."""

from __future__ import annotations

import types
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml

from vtprune.experiments.config import CONFIG_DIR, ConfigError, cell_key, load_grid, read_config_file
from vtprune.framework import build_registry, hookimpl
from vtprune.framework.stages import RelevanceScorer

BASE = {
    "model": {"name": "dummy"},
    "task": {"name": "synthetic", "options": {"n": 4}},
    "method": {"recipe": "zspaprune"},
    "tracking": {"mode": "disabled"},
}


def grid(**extra):
    return {"base": dict(BASE), **extra}


def problems_of(source, registry, overrides=()):
    with pytest.raises(ConfigError) as caught:
        load_grid(source, overrides, registry=registry)
    return caught.value.problems, str(caught.value)


def test_every_problem_in_one_error_with_key_paths(registry) -> None:
    config = grid(grid={"budget": [16, "x", 2.5], "method.recipe": ["zspaprune", "critical+fsp"], "nope": [1]})
    config["base"] = {**BASE, "model": {"name": "dummy", "dtyp": "float32"}, "positions": "kept", "seed": "one"}
    config["include"] = [{"method.params.critical": 0.3, "placement": "layer(k=9)"}]
    config["launcher"] = {"name": "slurmm"}
    problems, message = problems_of(config, registry)
    expected = [
        "base.model.dtyp: unknown key (did you mean 'dtype'?)",
        "base.positions: expected one of 'keep', 'compact', got 'kept'",
        "base.seed: expected int",
        "grid.budget[1]: expected int or float, got 'x'",
        "grid.nope: the run has no key 'nope'",
        "grid.budget[2]: a float budget is the fraction of tokens kept and must be in (0, 1]",
        "grid.method.recipe[1]: unknown stage or preset 'fsp'. Did you mean 'fps'?",
        "include[0].method.params.critical, include[0].placement: placement 'layer' drops before layer 9, but the language model of 'dummy' has 4 layers",
    ]
    for fragment in expected:
        assert any(fragment in p for p in problems), f"{fragment!r} not in:\n{message}"
    assert message.startswith(f"{len(problems)} problems in the config:")


def test_semantic_problems_task_launcher_and_stage_parameters(registry) -> None:
    config = grid(grid={"method.params.critical": [0.5, 1.5]}, launcher={"name": "slurmm"})
    config["base"]["task"] = {"name": "jsonl", "options": {"path": "/nonexistent.jsonl", "metrc": "vqa"}}
    problems, message = problems_of(config, registry)
    assert any(p.startswith("base.task: task 'jsonl' options:") and "metrc" in p for p in problems), message
    assert any(p.startswith("grid.method.params.critical[1]") and "critical must be in [0, 1]" in p for p in problems), message
    assert any(p.startswith("launcher.name: unknown launcher 'slurmm' (did you mean 'slurm'?)") for p in problems), message


def _save_config(folder: Path, next_: bool) -> str:
    from transformers import LlavaConfig, LlavaNextConfig

    from adapter_fixtures import tiny_clip_config, tiny_llama_config

    cls = LlavaNextConfig if next_ else LlavaConfig
    config = cls(vision_config=tiny_clip_config(), text_config=tiny_llama_config(), image_token_id=95)
    config.architectures = ["LlavaNextForConditionalGeneration" if next_ else "LlavaForConditionalGeneration"]
    config.save_pretrained(folder)
    return str(folder)


class NeedsGrid(RelevanceScorer):
    name: ClassVar[str] = "needs_grid"
    description: ClassVar[str] = "test stage that reads Signals.grid"
    requires: ClassVar[frozenset[str]] = frozenset({"grid"})

    def score(self, signals):
        return torch.zeros(signals.visual.shape[:2])


def test_adapter_placement_and_signal_checks_read_only_the_config_file(tmp_path) -> None:
    plugin = types.SimpleNamespace(vtprune_register_stages=hookimpl(lambda registry: registry.add_stage(NeedsGrid)))
    registry = build_registry(autoload=False, plugins=[plugin])
    llava = _save_config(tmp_path / "llava", next_=False)
    llava_next = _save_config(tmp_path / "llava_next", next_=True)
    config = grid(grid={"model.name": [llava, llava_next], "method.recipe": ["needs_grid+critical+fps", "zspaprune+pre_llm_clip"]})
    config["base"]["placement"] = None
    problems, message = problems_of(config, registry)
    assert any("needs_grid need signal(s) grid, which the 'llava_next' adapter cannot provide at placement 'pre_llm'" in p for p in problems), message
    assert any("adapter of model" in p and "does not implement placement 'pre_llm_clip'" in p for p in problems), message
    # the llava adapter provides the grid: that cell is fine
    assert not any("'llava' adapter cannot provide" in p for p in problems), message
    bad_dir = dict(config, grid={"model.name": [str(tmp_path / "missing")]})
    problems, _ = problems_of(bad_dir, registry)
    assert any(p.startswith("grid.model.name[0]") and "no such directory" in p for p in problems)


def test_expansion_include_exclude_seeds_and_baseline_first(registry) -> None:
    config = grid(
        grid={"budget": [8, 16], "method.recipe": ["zspaprune", "zspaprune+kmeans"]},
        exclude=[{"budget": 16, "method.recipe": "zspaprune+kmeans"}, {"seed": 1, "method.recipe": "zspaprune"}],
        include=[{"budget": 4, "placement": "layer(k=2)"}, {"budget": 8}],
        seeds=[0, 1],
    )
    spec = load_grid(config, registry=registry)
    assert spec.cells[0].is_baseline and not any(c.is_baseline for c in spec.cells[1:])
    got = sorted((c.config["budget"], c.config["method"]["recipe"], c.config["placement"], c.config["seed"]) for c in spec.cells[1:])
    assert got == [
        (4, "zspaprune", "layer(k=2)", 0),
        (8, "zspaprune", None, 0),  # the include {budget: 8} duplicates this grid cell: kept once
        (8, "zspaprune+kmeans", None, 0),
        (8, "zspaprune+kmeans", None, 1),
        (16, "zspaprune", None, 0),
    ]
    assert len({c.key for c in spec.cells}) == len(spec.cells)
    assert all(c.baseline_key == spec.cells[0].key for c in spec.cells[1:])
    unpruned = load_grid(grid(baseline=False, grid={"method": [None]}), registry=registry)
    assert [c.is_baseline for c in unpruned.cells] == [True]


def test_stage_parameter_axis_and_hash(registry) -> None:
    spec = load_grid(grid(grid={"method.params.critical": [0, 0.3, 1.0]}, baseline=False), registry=registry)
    from vtprune.experiments.config import build_pipeline

    splits = [build_pipeline(c.config, registry).budget.critical for c in spec.cells]
    assert splits == [0.0, 0.3, 1.0]
    config = spec.cells[0].config
    assert cell_key(config) == cell_key({**config, "tracking": {"mode": "online"}, "output_dir": "elsewhere"})
    assert cell_key(config) != cell_key({**config, "budget": 65})


def test_overrides(registry) -> None:
    config = grid(grid={"budget": [8, 16], "method.recipe": ["zspaprune"]})
    spec = load_grid(config, ["budget=32", "grid.method.recipe=[zspaprune, divprune]", "task.limit=2", "seeds=[3]"], registry=registry)
    pruned = [c for c in spec.cells if not c.is_baseline]
    assert sorted(c.config["method"]["recipe"] for c in pruned) == ["divprune", "zspaprune"]
    assert {c.config["budget"] for c in pruned} == {32} and {c.config["seed"] for c in pruned} == {3}
    assert {c.config["task"]["limit"] for c in spec.cells} == {2}
    problems, _ = problems_of(config, registry, ["novalue"])
    assert "write key=value" in problems[0]


def test_composition_extends_defaults_and_cycles(tmp_path, registry) -> None:
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"name": "a", "base": {**BASE, "budget": 8}, "grid": {"budget": [1, 2]}}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"base": {"seed": 5}}))
    (tmp_path / "c.yaml").write_text("defaults: [a.yaml, b.yaml]\nname: c\ngrid: {budget: [4]}\nbase:\n  output_dir: out/${name}\n")
    spec = load_grid(tmp_path / "c.yaml", registry=registry)
    run = spec.cells[-1].config
    assert (spec.name, run["budget"], run["seed"], run["output_dir"]) == ("c", 4, 5, "out/c")
    (tmp_path / "x.yaml").write_text("extends: y.yaml\n")
    (tmp_path / "y.yaml").write_text("extends: x.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        read_config_file(tmp_path / "x.yaml")


def test_yaml_is_loaded_safely(tmp_path, registry) -> None:
    (tmp_path / "evil.yaml").write_text("base: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="yaml"):
        load_grid(tmp_path / "evil.yaml", registry=registry)


SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_yaml_validates(path: Path) -> None:
    registry = build_registry(autoload=False)
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0].startswith("# ") and any("vtprune run" in l for l in lines[:4]) and any("Override" in l for l in lines[:4]), (
        f"{path.name} must start with a comment: what it is, the command that runs it, one override example"
    )
    task = (read_config_file(path).get("base") or {}).get("task", {}).get("name")
    if task not in registry.tasks:
        pytest.skip(f"task {task!r} is not registered yet")
    spec = load_grid(path, registry=registry)
    assert spec.cells


def test_budget_zero_is_a_cell_budget_only_at_a_withdrawing_placement(registry) -> None:
    """VTW cells (`vtw`, budget 0, k up to the number of layers) validate; 0 with any other placement is a problem
    naming `placement.withdraw`."""
    config = grid(grid={"budget": [0, 1.0]}, base={**BASE, "method": {"recipe": "vtw", "params": {"k": 4}}})
    spec = load_grid(config, registry=registry)  # the dummy model has 4 layers: withdraw(k=4) keeps everything
    assert sorted(c.config["budget"] for c in spec.cells if not c.is_baseline) == [0, 1.0]
    problems, message = problems_of(grid(grid={"budget": [0]}), registry)
    assert any(p.startswith("grid.budget[0]") and "placement.withdraw" in p for p in problems), message
    problems, message = problems_of(grid(grid={"budget": [0]}, base={**BASE, "method": {"recipe": "vtw", "params": {"k": 5}}}), registry)
    assert any("drops before layer 5" in p and "valid: 1..4" in p for p in problems), message
