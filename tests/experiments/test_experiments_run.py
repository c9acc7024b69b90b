"""Running grids with the dummy model: resume, failures, --retry-failed, JSONL robustness, report,
wandb offline, CLI, and the submitit launcher (local executor)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vtprune.cli import main
from vtprune.experiments.config import ConfigError, load_grid
from vtprune.framework import build_registry, hookimpl
from vtprune.experiments.models import DummyBackend
from vtprune.experiments.results import ResultsDir, append_jsonl, read_jsonl
from vtprune.experiments.runner import run_grid


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_grid(tmp_path: Path, **extra) -> Path:
    config = {
        "name": "t",
        "base": {
            "model": {"name": "dummy", "options": extra.pop("model_options", {})},
            "task": {"name": "synthetic", "options": {"n": 4}},
            "method": {"recipe": "zspaprune"},
            "generation": {"max_new_tokens": 2},
            "tracking": {"mode": "disabled", "log_images": 1},
            "output_dir": str(tmp_path / "out"),
        },
        "grid": {"budget": [8, 16]},
        **extra,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_grid_runs_resumes_and_skips_finished_cells(tmp_path, registry, monkeypatch) -> None:
    spec = load_grid(write_grid(tmp_path), registry=registry)
    calls = {"n": 0}
    real = DummyBackend.generate

    def flaky(self, samples, questions, handle, max_new_tokens):
        calls["n"] += 1
        if calls["n"] == 11:  # the process dies in the middle of the second pruned cell
            raise KeyboardInterrupt
        return real(self, samples, questions, handle, max_new_tokens)

    monkeypatch.setattr(DummyBackend, "generate", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_grid(spec, registry=registry, progress=False)
    results = ResultsDir(spec.output_dir)
    first, second, third = (c.key for c in spec.cells)
    assert {k: s["status"] for k, s in results.states().items()} == {first: "done", second: "done"}
    assert len(results.samples(third)) == 2  # appended as they came

    calls["n"] = -100
    summary = run_grid(spec, registry=registry, progress=False)
    assert calls["n"] == -98  # only the 2 missing samples of the interrupted cell ran again
    assert (summary.done, summary.skipped, summary.failed) == ([third], [first, second], [])
    state = results.states()[third]
    metrics = state["metrics"]
    assert metrics["n_samples"] == 4 and metrics["tokens_kept"] == 16 and metrics["tokens_visual"] == 64
    assert 0 < metrics["flops_ratio"] < 1 and 0 < metrics["kv_ratio"] < 1 and metrics["fidelity"] is not None
    assert metrics["prefill_ms"] > 0 and state["recipe"].startswith("prompt_cosine(pool=mean)")
    rerun = run_grid(spec, registry=registry, progress=False)
    assert rerun.done == [] and len(rerun.skipped) == 3
    assert (results.cell_dir(third) / "config.yaml").exists()


def test_failing_cell_is_recorded_grid_goes_on_and_retry_failed(tmp_path, capsys) -> None:
    path = write_grid(tmp_path, model_options={"fail_budgets": [8]})
    assert main(["run", str(path), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "1 failed" in out and "budget 8 is configured to fail" in out
    results = ResultsDir(tmp_path / "out")
    states = results.states()
    failed = [s for s in states.values() if s["status"] == "failed"]
    assert len(failed) == 1 and "Traceback" in failed[0]["traceback"] and failed[0]["assignment"] == {"budget": 8}
    assert sum(s["status"] == "done" for s in states.values()) == 2
    lines = len(list(read_jsonl(results.cells_file)))
    assert main(["run", str(path), "--no-progress"]) == 1  # not retried
    assert len(list(read_jsonl(results.cells_file))) == lines
    assert main(["run", str(path), "--no-progress", "--retry-failed"]) == 1  # retried (fails again)
    assert len(list(read_jsonl(results.cells_file))) == lines + 1
    assert main(["run", str(path), "model.options.fail_budgets=[]", "--no-progress"]) == 0  # a new cell key
    assert main(["plan", str(path)]) == 0
    assert "3 cells (1 unpruned baseline), 1 to run" in capsys.readouterr().out


def test_jsonl_tolerates_a_truncated_last_line(tmp_path) -> None:
    path = tmp_path / "x.jsonl"
    append_jsonl(path, {"id": 1})
    append_jsonl(path, {"id": 2, "values": [1.5, float("nan")]})
    with open(path, "a") as handle:
        handle.write('{"id": 3, "predic')  # killed mid-write
    assert [r["id"] for r in read_jsonl(path)] == [1, 2]
    append_jsonl(path, {"id": 4})
    assert [r["id"] for r in read_jsonl(path)] == [1, 2, 4]
    assert list(read_jsonl(path))[1]["values"] == [1.5, None]


def test_report_table_and_plots(tmp_path, capsys) -> None:
    path = write_grid(tmp_path, seeds=[0, 1], seeds_for="all")  # a deterministic method, repeated on request
    assert main(["run", str(path), "--no-progress"]) == 0
    assert main(["report", str(tmp_path / "out"), "--wide"]) == 0  # the table of every metric
    table = capsys.readouterr().out
    assert "| dummy | synthetic | unpruned | - |" in table and "| dummy | synthetic | zspaprune | 8 | 2 |" in table
    report = tmp_path / "out" / "report"
    for name in ("report.md", "report.csv", "accuracy_vs_tokens.png", "accuracy_vs_flops.png", "kept_tokens.png"):
        assert (report / name).stat().st_size > 0, name
    rows = (report / "report.csv").read_text().splitlines()
    assert rows[0].startswith("model,task,method,budget") and len(rows) == 4
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_wandb_offline_run_is_written_to_a_tmp_dir(tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    wandb_dir = tmp_path / "wandb_home"
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    path = write_grid(tmp_path, baseline=False, grid={"budget": [8]})
    spec = load_grid(path, ["tracking.mode=offline", "tracking.log_images=1"])
    summary = run_grid(spec, progress=False)
    assert summary.done and not summary.failed, ResultsDir(spec.output_dir).states()
    runs = list(wandb_dir.rglob("offline-run-*"))
    assert runs, list(wandb_dir.rglob("*"))
    assert list(runs[0].rglob("*.wandb"))


def test_slurm_launcher_with_the_submitit_local_executor(tmp_path) -> None:
    pytest.importorskip("submitit")
    path = write_grid(
        tmp_path,
        baseline=False,
        grid={"budget": [8]},
        launcher={"name": "slurm", "options": {"cluster": "local", "timeout_min": 2, "folder": str(tmp_path / "jobs")}},
    )
    spec = load_grid(path)
    summary = run_grid(spec, progress=False)
    assert len(summary.done) == 1, ResultsDir(spec.output_dir).states()
    assert list((tmp_path / "jobs").rglob("*_result.pkl"))


class CountingTask:
    """A third-party task: the interface the organism task implements."""

    metric = "right"

    def __init__(self, n: int = 3) -> None:
        self.n = n

    def samples(self, limit=None):
        from vtprune.experiments.tasks import Sample

        for index in range(self.n if limit is None else min(limit, self.n)):
            yield Sample(f"c{index}", [np.zeros((8, 8, 3), np.uint8)], "how many ?", ["two"])

    def score(self, sample, prediction):
        return {"right": float(prediction == "two"), "length": float(len(prediction))}


class RecordingLauncher:
    launched: list = []

    def __init__(self, tag: str = "") -> None:
        self.tag = tag

    def launch(self, cells, run_cell):
        for cell in cells:
            RecordingLauncher.launched.append((self.tag, cell.key))
            run_cell(cell)


class ThirdParty:
    @hookimpl
    def vtprune_register_tasks(self, registry):
        registry.add_task("counting", CountingTask, "test task")

    @hookimpl
    def vtprune_register_launchers(self, registry):
        registry.add_launcher("recording", RecordingLauncher, "test launcher")


def test_tasks_and_launchers_from_a_plugin(tmp_path) -> None:
    registry = build_registry(autoload=False, plugins=[ThirdParty()])
    config = {
        "base": {
            "model": {"name": "dummy"},
            "task": {"name": "counting", "options": {"n": 2}},
            "tracking": {"mode": "disabled"},
            "output_dir": str(tmp_path / "out"),
        },
        "grid": {"budget": [8]},
        "launcher": {"name": "recording", "options": {"tag": "x"}},
    }
    with pytest.raises(ConfigError, match="counting' options: .*'m'"):
        load_grid({**config, "base": {**config["base"], "task": {"name": "counting", "options": {"m": 2}}}}, registry=registry)
    spec = load_grid(config, registry=registry)
    summary = run_grid(spec, registry=registry, progress=False)
    assert len(summary.done) == 2 and [t for t, _ in RecordingLauncher.launched] == ["x", "x"]
    metrics = ResultsDir(spec.output_dir).states()[spec.cells[1].key]["metrics"]
    assert metrics["accuracy"] == metrics["score/right"] == 1.0 and metrics["score/length"] == 3.0


@pytest.mark.parametrize("module", ["config", "cost", "results", "measure", "overlay", "tasks"])
def test_docstring_examples_run(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"vtprune.experiments.{module}"))
    assert result.failed == 0 and result.attempted > 0
