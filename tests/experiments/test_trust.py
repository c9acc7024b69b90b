"""Issue 17, "experiments you can trust": one test (or more) per item, each failing before its fix."""

from __future__ import annotations

from pathlib import Path

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
