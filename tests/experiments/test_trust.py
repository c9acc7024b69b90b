"""Issue 17, "experiments you can trust": one test (or more) per item, each failing before its fix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from vtprune.experiments.config import ConfigError, load_grid
from vtprune.experiments.metrics import summarize
from vtprune.experiments.models import DummyBackend
from vtprune.experiments.results import ResultsDir
from vtprune.experiments.runner import run_grid
from vtprune.experiments.samples import Sample, task_answer
from vtprune.experiments.tasks import SyntheticTask
from vtprune.framework import build_registry, hookimpl
from vtprune.framework.stages import RelevanceScorer


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def grid(tmp_path: Path, **extra) -> dict:
    base = {
        "model": {"name": "dummy"},
        "task": {"name": "synthetic", "options": {"n": 4}},
        "method": {"recipe": "zspaprune"},
        "generation": {"max_new_tokens": 2},
        "tracking": {"mode": "disabled", "log_images": 0},
        "output_dir": str(tmp_path / "out"),
    }
    base.update(extra.pop("base", {}))
    return {"name": "t", "base": base, "grid": {"budget": [8]}, **extra}


# ------------------------------------------------------------------------------------------------
# 1. fidelity compares what the task scores
# ------------------------------------------------------------------------------------------------


class FirstWordTask(SyntheticTask):
    """The synthetic task scored on the first word only (as the organism is)."""

    def answer(self, sample: Sample, prediction: str) -> str:
        return prediction.split()[0] if prediction.split() else ""

    def score(self, sample: Sample, prediction: str) -> dict[str, float]:
        return {"exact_match": float(task_answer(self, sample, prediction) in sample.answers)}


class FirstWordPlugin:
    @hookimpl
    def vtprune_register_tasks(self, registry):
        registry.add_task("first_word", FirstWordTask, "synthetic, scored on the first word")


def test_fidelity_compares_the_task_answer_not_the_whole_text(tmp_path, monkeypatch) -> None:
    registry = build_registry(autoload=False, plugins=[FirstWordPlugin()])
    real = DummyBackend.generate

    def chatty(self, samples, questions, handle, max_new_tokens):
        outputs = real(self, samples, questions, handle, max_new_tokens)
        for output in outputs:  # every answer right; the pruned model rambles on after it
            output.prediction = "red" if handle is None else "red, I think"
        return outputs

    monkeypatch.setattr(DummyBackend, "generate", chatty)
    spec = load_grid(grid(tmp_path, base={"task": {"name": "first_word", "options": {"n": 4}}}), registry=registry)
    run_grid(spec, registry=registry, progress=False)
    results = ResultsDir(spec.output_dir)
    metrics = results.states()[spec.cells[1].key]["metrics"]
    assert metrics["fidelity"] == 1.0 and metrics["fidelity_text"] == 0.0
    assert {row["answer"] for row in results.samples(spec.cells[1].key)} == {"red"}
    from vtprune.experiments.report import collect_rows

    pruned = [row for row in collect_rows(spec.output_dir) if row["method"] != "unpruned"]
    assert pruned[0]["fidelity"] == 1.0 and pruned[0]["fidelity_text"] == 0.0


def test_organism_answer_is_its_first_word() -> None:
    from vtprune.experiments.organism.vqa_task import OrganismTask

    task = OrganismTask(n=1)
    sample = next(task.samples())
    assert task_answer(task, sample, "Red. circle") == "red"
    assert task_answer(SyntheticTask(), sample, "Red. circle") == "red circle"
    rows = [{"id": "a", "prediction": "red circle", "answer": "red"}]
    base = [{"id": "a", "prediction": "red", "answer": "red"}]
    out = summarize(rows, base)
    assert out["fidelity"] == 1.0 and out["fidelity_text"] == 0.0


# ------------------------------------------------------------------------------------------------
# 2. stale results: the key hashes the canonical composed recipe; a version change is reported
# ------------------------------------------------------------------------------------------------


def _scaled_stage(default: float) -> type:
    @dataclass(frozen=True, eq=False)
    class Scaled(RelevanceScorer):
        name: ClassVar[str] = "scaled"
        description: ClassVar[str] = "test stage whose default changes between releases"
        requires: ClassVar[frozenset[str]] = frozenset({"prompt"})
        scale: float = default

        def score(self, signals):
            return signals.visual.float().mean(-1) * self.scale  # (B, N)

    return Scaled


def _registry_with(stage: type):
    import types

    plugin = types.SimpleNamespace(vtprune_register_stages=hookimpl(lambda registry: registry.add_stage(stage)))
    return build_registry(autoload=False, plugins=[plugin])


def test_a_changed_stage_default_gives_a_new_key(tmp_path) -> None:
    config = grid(tmp_path, base={"method": {"recipe": "scaled+critical+fps"}})
    old_registry, new_registry = _registry_with(_scaled_stage(1.0)), _registry_with(_scaled_stage(2.0))
    old = load_grid(config, registry=old_registry)
    run_grid(old, registry=old_registry, progress=False)
    new = load_grid(config, registry=new_registry)
    assert old.cells[0].key == new.cells[0].key  # the unpruned run did not change
    assert old.cells[1].key != new.cells[1].key
    summary = run_grid(new, registry=new_registry, progress=False)
    assert summary.done == [new.cells[1].key] and summary.skipped == [new.cells[0].key]


def test_recipes_written_differently_but_resolving_alike_share_a_key(tmp_path, registry) -> None:
    spec = load_grid(grid(tmp_path, grid={"method.recipe": ["zspaprune", "zspaprune+fps"]}), registry=registry)
    assert len(spec.cells) == 2  # the baseline and one zspaprune cell


def test_a_version_change_is_reported_and_rerun_only_on_request(tmp_path, registry, monkeypatch, capsys) -> None:
    import vtprune

    spec = load_grid(grid(tmp_path), registry=registry)
    run_grid(spec, registry=registry, progress=False)
    monkeypatch.setattr(vtprune, "__version__", "99.0")
    summary = run_grid(spec, registry=registry, progress=False)
    assert summary.done == [] and sorted(summary.stale) == sorted(c.key for c in spec.cells)
    assert "vtprune " in summary.stale[spec.cells[1].key] and "-> 99.0" in summary.stale[spec.cells[1].key]
    assert "--rerun-stale" in summary.format(spec)
    import argparse

    from vtprune.experiments.cli import _cmd_plan  # plan says so too

    monkeypatch.setattr("vtprune.experiments.cli._load", lambda args: (spec, registry))
    _cmd_plan(argparse.Namespace())
    assert f"{spec.cells[1].key}  done (stale)" in capsys.readouterr().out
    summary = run_grid(spec, registry=registry, progress=False, rerun_stale=True)
    assert sorted(summary.done) == sorted(c.key for c in spec.cells) and not summary.stale
    results = ResultsDir(spec.output_dir)
    assert len(results.samples(spec.cells[1].key)) == 4
    assert (results.cell_dir(spec.cells[1].key) / "samples.0.stale.jsonl").exists()
    assert run_grid(spec, registry=registry, progress=False).stale == {}


# ------------------------------------------------------------------------------------------------
# 3. concurrent runs on one folder split the work (per-cell locks)
# ------------------------------------------------------------------------------------------------


def _hold_lock(folder: Path):
    """A separate process holding a cell's lock (as a concurrent ``vtprune run`` does)."""
    import subprocess
    import sys

    code = (
        "import sys, time; from pathlib import Path; from vtprune.experiments.locks import cell_lock\n"
        "with cell_lock(Path(sys.argv[1])) as mine:\n    print(mine, flush=True); time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "True"
    return process


def test_a_cell_locked_by_another_run_is_left_to_it(tmp_path, registry) -> None:
    spec = load_grid(grid(tmp_path, grid={"budget": [8, 16]}), registry=registry)
    results = ResultsDir(spec.output_dir)
    busy = spec.cells[1].key
    holder = _hold_lock(results.cell_dir(busy))
    try:
        summary = run_grid(spec, registry=registry, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert summary.pending == [busy] and busy not in results.states() and results.samples(busy) == []
    assert sorted(summary.done) == sorted(c.key for c in spec.cells if c.key != busy)
    assert "still running" in summary.format(spec)
    summary = run_grid(spec, registry=registry, progress=False)  # the holder died: its lock went with it
    assert summary.done == [busy]


def test_a_cell_finished_by_another_run_meanwhile_is_not_run_again(tmp_path, registry) -> None:
    from vtprune.experiments.runner import run_cell

    spec = load_grid(grid(tmp_path), registry=registry)
    first = run_cell(spec.cells[1], spec.output_dir, registry, progress=False)
    again = run_cell(spec.cells[1], spec.output_dir, registry, progress=False)
    assert again == first and len(list(ResultsDir(spec.output_dir).cells_file.open())) == 1


# ------------------------------------------------------------------------------------------------
# 6. validation: one pass, every problem at its own key path, suggestions only when close
# ------------------------------------------------------------------------------------------------


def problems_of(config: dict, registry) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_grid(config, registry=registry, check_models=False)
    return list(caught.value.problems)


def test_every_problem_of_a_method_at_its_own_key_path(tmp_path, registry) -> None:
    config = grid(
        tmp_path,
        base={"method": {"recipe": "zspaprune", "params": {"critcal": 0.3}}},
        grid={"method.recipe": ["zspaprune+kmeans(seed=x)"], "budget": [8]},
    )
    problems = problems_of(config, registry)
    assert any(p.startswith("grid.method.recipe[0]: ") and "seed" in p for p in problems), problems
    assert any(p.startswith("base.method.params.critcal: ") and "critcal" in p for p in problems), problems
    assert len(problems) == 2, problems


def test_type_and_semantic_problems_come_in_one_pass(tmp_path, registry) -> None:
    config = grid(tmp_path, base={"generation": {"max_new_tokens": "many"}}, launcher={"name": "slurmm"})
    config["base"]["method"] = {"recipe": "zspaprune+fsp"}
    problems = problems_of(config, registry)
    assert any(p.startswith("base.generation.max_new_tokens") for p in problems), problems
    assert any(p.startswith("launcher.name") and "slurm" in p for p in problems), problems
    assert any(p.startswith("base.method.recipe") and "fsp" in p for p in problems), problems


def test_a_far_key_gets_no_suggestion(tmp_path, registry) -> None:
    config = grid(tmp_path)
    config["base"]["pruning"] = {"preset": "zspaprune"}
    config["base"]["model"]["dtyp"] = "float16"
    problems = problems_of(config, registry)
    pruning = next(p for p in problems if p.startswith("base.pruning"))
    assert "did you mean" not in pruning and "valid keys" in pruning
    assert "did you mean 'dtype'" in next(p for p in problems if p.startswith("base.model.dtyp"))


# ------------------------------------------------------------------------------------------------
# 4. and 5. bad input caught with clear errors
# ------------------------------------------------------------------------------------------------


def test_a_scalar_axis_is_a_clear_problem(tmp_path, registry) -> None:
    problems = problems_of(grid(tmp_path, grid={"budget": 6}), registry)
    assert problems == ["grid.budget: an axis is a list of values, got 6; write [6] for one value, or set base.budget"]


def test_a_missing_grid_file_is_one_line(tmp_path, capsys) -> None:
    from vtprune.cli import main

    assert main(["plan", str(tmp_path / "nope.yaml"), "--no-plugins"]) == 2
    error = capsys.readouterr().err
    assert "no config file" in error and "shipped grids: " in error and "demo" in error and "Traceback" not in error


def test_ctrl_c_is_one_line_with_the_resume_hint(tmp_path, monkeypatch, capsys) -> None:
    import yaml

    from vtprune.cli import INTERRUPTED, main
    from vtprune.experiments import runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_grid", interrupted)
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid(tmp_path)))
    assert main(["run", str(path), "--no-plugins"]) == INTERRUPTED
    assert "interrupted; finished cells and samples are kept" in capsys.readouterr().err


def test_select_example_rejects_a_negative_int_budget_as_an_int(capsys) -> None:
    from vtprune.cli import main

    with pytest.raises(SystemExit):
        main(["select-example", "--budget", "-1"])
    error = capsys.readouterr().err
    assert "positive token count, got -1" in error and "float" not in error


def test_signals_with_a_prompt_of_another_width_are_rejected() -> None:
    from vtprune.framework import Signals

    with pytest.raises(ValueError, match="prompt has width D=8 but Signals.visual has D=16"):
        Signals(visual=torch.zeros(1, 4, 16), prompt=torch.zeros(1, 3, 8))


def test_a_grid_without_model_name_is_rejected(tmp_path, registry) -> None:
    config = grid(tmp_path)
    del config["base"]["model"]
    problems = problems_of(config, registry)
    assert any(p.startswith("base.model.name: required") and "'dummy'" in p for p in problems), problems


@pytest.mark.parametrize("size", [0, -3])
def test_batch_size_must_be_positive(tmp_path, registry, size) -> None:
    problems = problems_of(grid(tmp_path, base={"generation": {"batch_size": size}}), registry)
    assert any(p.startswith("base.generation.batch_size: must be >= 1") and str(size) in p for p in problems), problems


def test_a_limit_above_the_task_size_is_said(tmp_path, registry) -> None:
    spec = load_grid(grid(tmp_path, base={"task": {"name": "synthetic", "options": {"n": 3}, "limit": 5}}), registry=registry)
    summary = run_grid(spec, registry=registry, progress=False)
    assert "NOTE" in summary.format(spec) and "task.limit is 5 but task 'synthetic' has 3 samples" in summary.format(spec)


# ------------------------------------------------------------------------------------------------
# 7. seeds repeat only the cells whose stages draw random numbers
# ------------------------------------------------------------------------------------------------


def _seeded(spec) -> list[tuple[str, int]]:
    return sorted((cell.config["method"]["recipe"], cell.config["seed"]) for cell in spec.cells if not cell.is_baseline)


def test_seeds_repeat_only_stochastic_cells(tmp_path, registry) -> None:
    config = grid(tmp_path, grid={"method.recipe": ["zspaprune", "zspaprune+kmeans", "random"]}, seeds=[3, 4])
    spec = load_grid(config, registry=registry, check_models=False)
    assert _seeded(spec) == [("random", 3), ("random", 4), ("zspaprune", 3), ("zspaprune+kmeans", 3), ("zspaprune+kmeans", 4)]
    every = load_grid({**config, "seeds_for": "all"}, registry=registry, check_models=False)
    assert ("zspaprune", 4) in _seeded(every) and len(_seeded(every)) == 6


def test_a_stage_declares_whether_it_draws_random_numbers() -> None:
    from vtprune.framework.stages import is_stochastic

    registry = build_registry(autoload=False)
    assert is_stochastic(registry.stage("diversity", "kmeans")) and is_stochastic(registry.stage("relevance", "random"))
    assert not is_stochastic(registry.stage("diversity", "fps"))

    class Shuffled(_scaled_stage(1.0)):
        stochastic: ClassVar[bool] = True  # draws from the global generator: no seed parameter

    assert is_stochastic(Shuffled) and not is_stochastic(_scaled_stage(1.0))


def test_the_demo_grid_needs_no_seed_excludes_for_deterministic_methods() -> None:
    from vtprune.experiments.gridfiles import CONFIG_DIR, read_config_file

    excluded = {entry["method.recipe"] for entry in read_config_file(CONFIG_DIR / "demo.yaml")["exclude"]}
    assert excluded == {"zspaprune+kmeans"}


# ------------------------------------------------------------------------------------------------
# 10. wandb resumes a cell's run; plan shows partial cells; flags and overrides in any order
# ------------------------------------------------------------------------------------------------


def test_a_retried_cell_resumes_its_wandb_run(tmp_path, registry, monkeypatch) -> None:
    import sys
    import types

    calls: list[dict] = []

    class FakeRun:
        summary: dict = {}

        def log(self, data):
            pass

        def finish(self, exit_code=0):
            pass

    fake = types.SimpleNamespace(init=lambda **kwargs: calls.append(kwargs) or FakeRun(), Settings=lambda **kwargs: kwargs)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    spec = load_grid(grid(tmp_path, base={"tracking": {"mode": "offline", "log_images": 0}}), registry=registry)
    from vtprune.experiments.runner import run_cell

    run_cell(spec.cells[1], spec.output_dir, registry, progress=False)
    ResultsDir(spec.output_dir).record({"key": spec.cells[1].key, "status": "failed"})
    run_grid(spec, registry=registry, progress=False, retry_failed=True)
    ids = [call["id"] for call in calls if spec.cells[1].key in call["id"]]
    assert len(ids) == 2 and len(set(ids)) == 1 and all(call["resume"] == "allow" for call in calls)


def test_plan_shows_partial_cells(tmp_path, registry, monkeypatch, capsys) -> None:
    import yaml

    from vtprune.cli import main

    config = grid(tmp_path, base={"task": {"name": "synthetic", "options": {"n": 4}, "limit": 4}})
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(config))
    spec = load_grid(config, registry=registry)
    calls = {"n": 0}
    real = DummyBackend.generate

    def dies(self, *args):
        calls["n"] += 1
        if calls["n"] == 7:  # the third sample of the pruned cell
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(DummyBackend, "generate", dies)
    with pytest.raises(KeyboardInterrupt):
        run_grid(spec, registry=registry, progress=False)
    capsys.readouterr()
    assert main(["plan", str(path), "--no-plugins"]) == 0
    out = capsys.readouterr().out
    assert f"{spec.cells[0].key}  done" in out and f"{spec.cells[1].key}  partial (2 of 4)" in out


def test_flags_before_or_after_overrides(tmp_path, capsys) -> None:
    import yaml

    from vtprune.cli import main

    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid(tmp_path)))
    assert main(["plan", str(path), "--no-plugins", "grid.budget=[8,16,32]"]) == 0
    assert "4 cells" in capsys.readouterr().out
    assert main(["plan", str(path), "grid.budget=[8,16]", "--no-plugins"]) == 0
    assert "3 cells" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# 8. output without a terminal; the weights load once per (model, dtype, device, ...)
# ------------------------------------------------------------------------------------------------


def test_without_a_terminal_each_cell_is_one_line(tmp_path, capsys) -> None:
    import yaml

    from vtprune.cli import main

    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid(tmp_path, grid={"budget": [8, 16]})))
    assert main(["run", str(path), "--no-plugins"]) == 0  # captured output is not a TTY
    captured = capsys.readouterr()
    assert [line.split()[:2] for line in captured.out.splitlines() if line.startswith("[")] == [
        ["[1/3]", "done"], ["[2/3]", "done"], ["[3/3]", "done"]
    ]
    assert "%|" not in captured.err and "sample/s" not in captured.err


def test_the_weights_load_once_when_only_prompt_settings_differ(tmp_path, registry) -> None:
    from vtprune.experiments.runner import CellRunner

    config = grid(tmp_path, grid={"model.prompt_template": ["A {question}", "B {question}"], "budget": [8, 16]})
    spec = load_grid(config, registry=registry)
    runner = CellRunner(spec.output_dir, registry, progress=False, pipelines=spec.pipelines)
    summary = run_grid(spec, registry=registry, progress=False, runner=runner)
    assert len(summary.done) == 6 and runner.cache.loads == 1


# ------------------------------------------------------------------------------------------------
# 9. the report prints the README's view; plots and overlays show the grid's methods
# ------------------------------------------------------------------------------------------------


def test_report_prints_method_by_budget_in_grid_order(tmp_path, capsys) -> None:
    import yaml

    from vtprune.cli import main

    config = grid(
        tmp_path, grid={"budget": [16, 8], "method.recipe": ["zspaprune", "divprune", "random"]},
        seeds=[0, 1], base={"tracking": {"mode": "disabled", "log_images": 2}},
    )
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--no-plugins"]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "out")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert lines[0] == "| method | all tokens | 16 tokens | 8 tokens |"
    assert [line.split(" | ")[0] for line in lines[1:]] == ["| unpruned", "| zspaprune", "| divprune", "| random (2 seeds)"]
    assert all(line.count("|") == 5 for line in lines) and "dummy | synthetic" not in "\n".join(lines)
    assert "± " in lines[2] or lines[2].split(" | ")[2].strip() == "1.000"
    report = (tmp_path / "out" / "report" / "report.md").read_text()
    assert report.startswith("# vtprune report: t\n") and "## All metrics" in report


def test_report_tells_tasks_apart_by_the_options_that_vary() -> None:
    """A grid over a task option (auto_split.yaml: ``task.options.scenes``) gets one table per value, also when two
    tasks share a model; an option every cell has alike stays out of the label."""
    from vtprune.experiments.report import _task_labels

    def cfg(scenes: str, n: int = 500) -> dict:
        return {"task": {"name": "organism", "options": {"split": "test", "n": n, "scenes": scenes}}}

    assert _task_labels([cfg("clutter"), cfg("crowd"), cfg("clutter")]) == [
        "organism (scenes=clutter)", "organism (scenes=crowd)", "organism (scenes=clutter)"]
    assert _task_labels([cfg("clutter"), cfg("clutter")]) == ["organism", "organism"]
    assert _task_labels([cfg("shapes", 10), cfg("crowd", 20), {"task": {"name": "synthetic"}}]) == [
        "organism (n=10, scenes=shapes)", "organism (n=20, scenes=crowd)", "synthetic"]


def test_overlays_show_every_method_at_one_budget(tmp_path, registry, monkeypatch) -> None:
    from vtprune.experiments import plots

    config = grid(
        tmp_path, grid={"budget": [16, 8], "method.recipe": ["zspaprune", "divprune", "random", "pooling", "zspaprune+grid"]},
        base={"tracking": {"mode": "disabled", "log_images": 1}},
    )
    spec = load_grid(config, registry=registry)
    run_grid(spec, registry=registry, progress=False)
    from vtprune.experiments.report import collect_rows

    rows = collect_rows(spec.output_dir)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles: list[str] = []  # the methods' row titles, read as the montage's figure is closed
    monkeypatch.setattr(plt, "close", lambda figure: titles.extend(a.get_title(loc="left") for a in figure.axes if a.get_title(loc="left")))
    assert plots._overlay_montage(rows, Path(spec.output_dir), tmp_path, 8, plt) is not None
    assert titles == ["zspaprune", "divprune", "random", "pooling", "zspaprune+grid"]


_CONCURRENT_RUN = """
import sys, time
from vtprune.experiments.config import load_grid
from vtprune.experiments.runner import run_grid
from vtprune.experiments.tasks import SyntheticTask
from vtprune.framework import build_registry, hookimpl

class SlowTask(SyntheticTask):
    def score(self, sample, prediction):
        time.sleep(0.02)  # long enough for the two runs to overlap
        return super().score(sample, prediction)

class Plugin:
    @hookimpl
    def vtprune_register_tasks(self, registry):
        registry.add_task("slow", SlowTask, "synthetic, slowly scored")

registry = build_registry(autoload=False, plugins=[Plugin()])
spec = load_grid(sys.argv[1], registry=registry)
while time.time() < float(sys.argv[2]):  # both processes start together
    time.sleep(0.01)
run_grid(spec, registry=registry, progress=False)
"""


@pytest.mark.slow  # two processes
def test_two_concurrent_runs_on_one_folder_split_the_work(tmp_path) -> None:
    import subprocess
    import sys
    import time

    import yaml

    config = grid(tmp_path, grid={"budget": [4, 8, 12, 16, 24, 32]}, base={"task": {"name": "slow", "options": {"n": 8}}})
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(config))
    start = str(time.time() + 8)
    runs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_RUN, str(path), start]) for _ in range(2)]
    assert [run.wait(timeout=300) for run in runs] == [0, 0]
    results = ResultsDir(tmp_path / "out")
    records = [line for line in results.cells_file.read_text().splitlines() if line.strip()]
    assert len(records) == 7  # one "done" record per cell, none twice
    for key in results.states():
        assert len(results.samples_file(key).read_text().splitlines()) == 8  # every sample answered once
