"""`build_pipeline` runs once per distinct method of a grid: validation and running share the
composed pipelines (`PipelineCache` on the `GridSpec`)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

from vtprune.experiments import pipelines, runner
from vtprune.experiments.config import load_grid
from vtprune.experiments.pipelines import PipelineCache, method_key
from vtprune.experiments.results import ResultsDir
from vtprune.experiments.runner import run_grid


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def build_calls(monkeypatch) -> Counter:
    """Counts `build_pipeline` calls per method key, wherever they come from."""
    calls: Counter = Counter()
    real = pipelines.build_pipeline

    def spy(run: Any, registry: Any = None) -> Any:
        calls[method_key(run)] += 1
        return real(run, registry)

    monkeypatch.setattr(pipelines, "build_pipeline", spy)
    monkeypatch.setattr(runner, "build_pipeline", spy)
    return calls


def grid(tmp_path) -> dict[str, Any]:
    return {
        "name": "once",
        "base": {
            "model": {"name": "dummy"},
            "task": {"name": "synthetic", "options": {"n": 2}},
            "method": {"recipe": "critical+kmeans"},
            "generation": {"max_new_tokens": 1},
            "tracking": {"mode": "disabled"},
            "output_dir": str(tmp_path / "out"),
        },
        "grid": {"budget": [8, 16], "method.params.critical": [0.3, 0.6]},
    }


def test_validation_and_run_compose_each_method_once(tmp_path, registry, build_calls) -> None:
    spec = load_grid(grid(tmp_path), registry=registry)
    pruned = [cell for cell in spec.cells if not cell.is_baseline]
    methods = {method_key(cell.config) for cell in pruned}
    assert len(pruned) == 4 and len(methods) == 2  # two budgets share each method
    assert build_calls == Counter({key: 1 for key in methods})  # validation composed each once
    summary = run_grid(spec, registry=registry, progress=False)
    assert len(summary.done) == len(spec.cells)
    assert build_calls == Counter({key: 1 for key in methods})  # ... and running composed nothing again
    states = ResultsDir(spec.output_dir).states()
    for cell in pruned:
        assert states[cell.key]["recipe"] == str(spec.pipelines.get(cell.config))
        assert "kmeans(seed=0" in states[cell.key]["recipe"]  # the run seed reached the seed parameter


def test_a_different_registry_composes_its_own(tmp_path, registry, build_calls) -> None:
    from vtprune.framework import build_registry

    spec = load_grid(grid(tmp_path), registry=registry)
    other = build_registry(autoload=False)
    run_grid(spec, registry=other, progress=False)
    assert sum(build_calls.values()) == 2 + 4  # 2 while validating, then one per pruned cell with `other`


def test_cache_keys_on_what_build_pipeline_reads(registry) -> None:
    cache = PipelineCache(registry)
    run = {"method": {"recipe": "critical+kmeans", "params": {}}, "placement": None, "seed": 1, "budget": 8}
    first = cache.get(run)
    assert cache.get({**run, "budget": 16}) is first  # the budget is not part of the pipeline
    assert cache.get({**run, "seed": 2}) is not first and len(cache) == 2
    assert cache.get({**run, "method": None}) is None
