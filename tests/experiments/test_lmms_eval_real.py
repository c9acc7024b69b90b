"""The vtprune model plugin inside the REAL lmms-eval (the CPU lean install of docs/experiments.md:
``pip install --no-deps lmms-eval==0.7.3`` + its few imports, no torchvision), on a local task
folder built here from the organism (`lmms_organism_task`): ``simple_evaluate``, a grid cell with
``task: lmms_eval`` and ``include_path``, and (slow) the ``lmms-eval`` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "lmms_eval.evaluator",
    reason="lmms-eval is not importable here: `make install` installs it (the CPU route of docs/experiments.md#lmms-eval)",
)

from lmms_organism_task import ORGANISM_MODEL, ORGANISM_TEMPLATE, TASK_NAME, write_organism_task  # noqa: E402

from vtprune.framework.errors import VtpruneError  # noqa: E402

N = 8


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    return write_organism_task(tmp_path_factory.mktemp("lmms_task"), N)


@pytest.fixture(scope="module")
def manager(task_folder):
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_folder))


def _model(**args):
    from vtprune.experiments.lmms_eval_model import build_model_class

    torch.set_num_threads(1)
    defaults = {"pretrained": ORGANISM_MODEL, "device": "cpu", "dtype": "float32", "prompt_template": ORGANISM_TEMPLATE}
    return build_model_class()(**{**defaults, **args})


def _evaluate(model, manager, **kwargs):
    from lmms_eval import evaluator

    return evaluator.simple_evaluate(model=model, tasks=[TASK_NAME], limit=N, log_samples=True, task_manager=manager, **kwargs)


def test_simple_evaluate_batches_prunes_and_answers_as_alone(manager) -> None:
    alone = _model(recipe="none", batch_size=1)
    together = _model(recipe="none", batch_size=4)
    out_alone, out_together = _evaluate(alone, manager, batch_size=1), _evaluate(together, manager, batch_size=4)
    assert out_alone["results"][TASK_NAME]["exact_match,none"] == 1.0
    assert [a.text for a in together.answered] == [a.text for a in alone.answered]
    assert (alone._batches, together._batches) == (N, N // 4)  # 4 requests per generate call
    pruned_alone = _model(recipe="zspaprune", budget=1, batch_size=1)
    pruned_auto = _model(recipe="zspaprune", budget=1, batch_size="auto", max_batch_size=N)
    out = _evaluate(pruned_alone, manager, batch_size=1)
    _evaluate(pruned_auto, manager, batch_size="auto")
    assert pruned_auto._batches == 1 and pruned_auto.batch_size_per_gpu == N
    assert [a.text for a in pruned_auto.answered] == [a.text for a in pruned_alone.answered]
    assert out["results"][TASK_NAME]["exact_match,none"] < 1.0
    assert all(a.generation.kept == [1] for a in pruned_auto.answered)
    assert out_together["samples"][TASK_NAME][0]["filtered_resps"][0] == together.answered[0].text


def test_gen_kwargs_are_applied_or_refused(manager) -> None:
    greedy = _model(recipe="none", batch_size=N)
    _evaluate(greedy, manager, batch_size=N, gen_kwargs="max_new_tokens=8")
    stopped = _model(recipe="none", batch_size=N)
    _evaluate(stopped, manager, batch_size=N, gen_kwargs="max_new_tokens=8,until=e")
    assert [a.text for a in stopped.answered] == [a.text.split("e")[0] for a in greedy.answered]
    assert any("e" in a.text for a in greedy.answered)
    hot = _model(recipe="none", batch_size=N)
    torch.manual_seed(0)
    _evaluate(hot, manager, batch_size=N, gen_kwargs="max_new_tokens=8,temperature=50.0,do_sample=True,top_k=0")
    assert [a.text for a in hot.answered] != [a.text for a in greedy.answered]  # sampled at a high temperature
    cut = _model(recipe="none", batch_size=N)
    _evaluate(cut, manager, batch_size=N, gen_kwargs="max_new_tokens=1")
    assert all(len(a.text.split()) == 1 for a in cut.answered)
    with pytest.raises(VtpruneError, match=r"'image_aspect_ratio' not supported.*supported: max_new_tokens"):
        _evaluate(_model(recipe="none"), manager, gen_kwargs="image_aspect_ratio=pad")
    with pytest.raises(VtpruneError, match="num_beams=3 not supported"):
        _evaluate(_model(recipe="none"), manager, gen_kwargs="num_beams=3")


def test_the_processors_chat_template(manager, task_folder) -> None:
    """The model renders lmms-eval chat histories with the processor's template; the answer to that
    prompt equals the default route's (no prompt_template: the processor's template too)."""
    from lmms_eval.api.instance import Instance

    from vtprune.experiments.organism.vqa_task import OrganismTask

    model = _model(recipe="none", prompt_template=None)
    assert model.chat_template and "ASSISTANT" in model.chat_template
    sample = next(OrganismTask(split="test", n=1).samples())
    context = model.apply_chat_template([{"role": "user", "content": sample.question}])
    assert context == f"USER: {sample.question} ASSISTANT:"
    model.task_dict = {"t": {"test": [{"q": sample.question}]}}
    visual = lambda doc: [sample.images[0]]  # noqa: E731
    requests = [
        Instance("generate_until", (ctx, {"max_new_tokens": 2, "until": ["\n"]}, visual, 0, "t", "test"), 0, {"task": "t", "doc_id": 0, "repeats": 1})
        for ctx in (context, sample.question)
    ]
    answers = model.generate_until(requests)
    assert answers[0] == answers[1] == sample.answers[0]


@pytest.mark.slow
def test_a_grid_cell_with_a_local_lmms_eval_task_reports_the_organism_columns(task_folder, tmp_path) -> None:
    from vtprune.experiments.config import load_grid
    from vtprune.experiments.results import ResultsDir
    from vtprune.experiments.runner import run_grid

    torch.set_num_threads(1)
    config = {
        "base": {
            "model": {"name": ORGANISM_MODEL, "dtype": "float32", "device": "cpu", "prompt_template": ORGANISM_TEMPLATE,
                      "prompt_stop": " ASSISTANT:"},
            "task": {"name": "lmms_eval", "options": {"tasks": [TASK_NAME], "include_path": str(task_folder), "batch_size": "auto"}, "limit": N},
            "method": {"recipe": "zspaprune"},
            "generation": {"max_new_tokens": 2, "batch_size": 4},
            "tracking": {"mode": "disabled"},
            "output_dir": str(tmp_path / "out"),
        },
        "grid": {"budget": [1]},
    }
    spec = load_grid(config)
    summary = run_grid(spec, progress=False)
    results = ResultsDir(tmp_path / "out")
    states = results.states()
    assert not summary.failed, [s.get("traceback") for s in states.values()]
    baseline = next(s["metrics"] for s in states.values() if s["label"] != "zspaprune")
    pruned = next(s for s in states.values() if s["label"] == "zspaprune")
    metrics = pruned["metrics"]
    for column in ("accuracy", "fidelity", "fidelity_text", "tokens_visual", "tokens_kept", "kept_ratio", "flops", "flops_ratio",
                   "kv_bytes", "kv_ratio", "prefill_ms", "decode_ms_per_token", f"{TASK_NAME}/exact_match", "score/exact_match"):
        assert metrics.get(column) is not None, column
    assert baseline["accuracy"] == 1.0 and baseline[f"{TASK_NAME}/exact_match"] == 1.0
    assert metrics["tokens_kept"] == 1 and metrics["tokens_visual"] == 64 and metrics["n_samples"] == N
    rows = results.samples(pruned["key"])
    assert metrics["fidelity"] == pytest.approx(sum(r["accuracy"] for r in rows) / N)  # unpruned is always right
    assert metrics["accuracy"] == pytest.approx(metrics["score/exact_match"])
    assert {r["id"] for r in rows} == {f"{TASK_NAME}/test/{i}" for i in range(N)}
    assert all(r["flops"] < r["flops_unpruned"] and r["kv_bytes"] < r["kv_bytes_unpruned"] for r in rows)


def test_task_options_are_checked_and_the_upstream_chat_template_gap_is_named(task_folder) -> None:
    from lmms_eval.api.task import ConfigurableTask

    from vtprune.experiments.lmms_eval_run import chat_template_problem
    from vtprune.experiments.tasks import LmmsEvalTask

    problem = chat_template_problem()
    assert (problem is None) == hasattr(ConfigurableTask, "append_target_question")
    if problem:
        assert "append_target_question" in problem and "prompt_template" in problem

    with pytest.raises(VtpruneError, match="include_path: no such folder"):
        LmmsEvalTask(tasks=[TASK_NAME], include_path=str(task_folder / "missing"))
    with pytest.raises(VtpruneError, match="batch_size must be"):
        LmmsEvalTask(tasks=[TASK_NAME], batch_size="many")


@pytest.mark.slow
def test_the_lmms_eval_command_line(task_folder, tmp_path) -> None:
    records = tmp_path / "records.jsonl"
    args = (
        f"pretrained={ORGANISM_MODEL},recipe=zspaprune,budget=1,device=cpu,dtype=float32,"
        f"prompt_template={ORGANISM_TEMPLATE},records={records},fidelity=true"
    )
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "vtprune", "--model_args", args, "--tasks", TASK_NAME,
        "--include_path", str(task_folder), "--batch_size", "auto", "--max_batch_size", "4", "--limit", str(N),
        "--gen_kwargs", "max_new_tokens=2", "--output_path", str(tmp_path / "out"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (result_file,) = list((tmp_path / "out").rglob("*results.json"))
    assert json.loads(result_file.read_text())["results"][TASK_NAME]["exact_match,none"] < 1.0
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(rows) == N and all(r["tokens_kept"] == 1 and r["visual_tokens"] == 64 for r in rows)
    assert len({r["batch"] for r in rows}) == N // 4
    assert {r["unpruned_answer"] for r in rows} and all(r["flops"] < r["flops_unpruned"] for r in rows)
