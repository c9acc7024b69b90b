"""The lmms-eval model plugin, against a minimal stub of lmms-eval's API (lmms-eval itself needs
torchvision, which this environment cannot install): discovery manifest, the ``lmms`` subclass,
``generate_until`` requests, and a grid cell that runs a task through the stub evaluator."""

from __future__ import annotations

import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch

STUB = {
    "lmms_eval/__init__.py": "",
    "lmms_eval/api/__init__.py": "",
    "lmms_eval/api/model.py": """
        import abc
        class lmms(abc.ABC):
            is_simple = True
            def __init__(self):
                self.task_dict = {}
            @abc.abstractmethod
            def loglikelihood(self, requests): ...
            @abc.abstractmethod
            def generate_until(self, requests): ...
            @abc.abstractmethod
            def generate_until_multi_round(self, requests): ...
    """,
    "lmms_eval/api/instance.py": """
        from dataclasses import dataclass, field
        @dataclass
        class Instance:
            request_type: str
            arguments: tuple
            idx: int
            metadata: dict = field(default_factory=dict)
            @property
            def args(self):
                return self.arguments
    """,
    "lmms_eval/models/__init__.py": "",
    "lmms_eval/models/registry_v2.py": """
        from dataclasses import dataclass
        @dataclass(frozen=True)
        class ModelManifest:
            model_id: str
            simple_class_path: str = None
            chat_class_path: str = None
            aliases: tuple = ()
    """,
    "lmms_eval/evaluator.py": """
        import numpy as np
        from lmms_eval.api.instance import Instance
        DOCS = [{"q": "what color is the square ?", "a": "red"}, {"q": "what color is the square ?", "a": "blue"}]
        def simple_evaluate(model, tasks, limit=None, **kwargs):
            results = {}
            for task in tasks:
                model.task_dict[task] = {"test": DOCS}
                visual = lambda doc: [np.full((16, 16, 3), 200, np.uint8)]
                requests = [Instance("generate_until", ("<image>\\n" + d["q"], {"until": ["\\n"], "max_new_tokens": 2}, visual, i, task, "test"), i,
                                     {"task": task, "doc_id": i, "repeats": 1}) for i, d in enumerate(DOCS[:limit])]
                answers = model.generate_until(requests)
                score = sum(a == d["a"] for a, d in zip(answers, DOCS)) / len(answers)
                results[task] = {"alias": task, "exact_match,none": score, "exact_match_stderr,none": 0.1}
            return {"results": results}
    """,
}


@pytest.fixture
def stub_lmms_eval(tmp_path, monkeypatch):
    for name, text in STUB.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in [m for m in sys.modules if m == "lmms_eval" or m.startswith("lmms_eval.")]:
        monkeypatch.delitem(sys.modules, module)
    import vtprune.experiments.lmms_eval_model as plugin

    monkeypatch.setattr(plugin, "_CLASS", None)
    yield plugin
    for module in [m for m in sys.modules if m == "lmms_eval" or m.startswith("lmms_eval.")]:
        sys.modules.pop(module, None)


def test_entry_point_is_declared() -> None:
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["lmms_eval.models"]["vtprune"] == "vtprune.experiments.lmms_eval_model:manifest"
    assert any(r.startswith("lmms-eval") for r in project["optional-dependencies"]["eval"])


def test_manifest_and_model_class(stub_lmms_eval) -> None:
    import importlib

    from lmms_eval.api.model import lmms

    manifest = stub_lmms_eval.manifest()
    assert manifest.model_id == "vtprune"
    module_name, class_name = manifest.simple_class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), class_name)
    assert issubclass(cls, lmms) and cls.is_simple
    model = cls(pretrained="dummy", recipe="zspaprune", budget=8, critical=0.5, max_batch_size=None)
    assert model.handle.pipeline.budget.critical == 0.5
    from lmms_eval import evaluator

    output = evaluator.simple_evaluate(model=model, tasks=["gqa"], limit=2)
    assert set(output["results"]["gqa"]) >= {"exact_match,none"}
    assert [len(a.generation.kept_indices[0]) for a in model.answered] == [8, 8]
    with pytest.raises(NotImplementedError, match="generate_until"):
        model.loglikelihood([])


def test_a_grid_cell_runs_lmms_eval_tasks(stub_lmms_eval, tmp_path) -> None:
    from vtprune.experiments.config import load_grid
    from vtprune.experiments.results import ResultsDir
    from vtprune.experiments.runner import run_grid

    config = {
        "base": {
            "model": {"name": "dummy"},
            "task": {"name": "lmms_eval", "options": {"tasks": ["gqa", "pope"]}, "limit": 2},
            "method": {"recipe": "zspaprune"},
            "tracking": {"mode": "disabled"},
            "output_dir": str(tmp_path / "out"),
        },
        "grid": {"budget": [8]},
    }
    torch.set_num_threads(1)
    summary = run_grid(load_grid(config), progress=False)
    states = ResultsDir(tmp_path / "out").states()
    assert not summary.failed, [s.get("traceback") for s in states.values()]
    metrics = next(s["metrics"] for s in states.values() if s["label"] == "zspaprune")
    assert set(metrics) >= {"gqa/exact_match", "pope/exact_match", "accuracy", "tokens_kept"}
    assert metrics["tokens_kept"] == 8 and metrics["n_samples"] == 4


def test_parse_gen_kwargs_applies_or_refuses() -> None:
    from vtprune.experiments.gen_options import SUPPORTED, cut_at_stops, parse_gen_kwargs
    from vtprune.framework.errors import VtpruneError

    options = parse_gen_kwargs({"temperature": "0.7", "top_p": 0.9, "until": "\n\n", "stop": ["###"]}, 16)
    assert (options.max_new_tokens, options.do_sample, options.temperature, options.until) == (16, True, 0.7, ("\n\n", "###"))
    assert options.generate_kwargs() == {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
    greedy = parse_gen_kwargs({"temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False, "max_new_tokens": 3}, 16)
    assert greedy.generate_kwargs() == {"do_sample": False} and greedy.max_new_tokens == 3
    assert cut_at_stops("a###b\n\nc", options.until) == "a" and cut_at_stops("abc", ()) == "abc"
    bad = [({"foo": 1}, "'foo' not supported.*" + ", ".join(SUPPORTED)), ({"num_beams": 4}, "num_beams=4"),
           ({"do_sample": True, "temperature": 0}, "temperature > 0"), ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
           ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"), ({"do_sample": "maybe"}, "expected true or false"),
           ({"until": [1]}, "list of strings"), ({"max_new_tokens": 2.5}, "whole number")]
    for kwargs, message in bad:
        with pytest.raises(VtpruneError, match=message):
            parse_gen_kwargs(kwargs, 16)


def test_batch_size_auto_halves_on_out_of_memory_and_keeps_the_size(stub_lmms_eval) -> None:
    from lmms_eval.api.instance import Instance

    from vtprune.framework.errors import VtpruneError

    assert stub_lmms_eval.parse_batch_size("auto:4") == "auto" and stub_lmms_eval.parse_batch_size("3") == 3
    for bad in ("0", "lots", -1):
        with pytest.raises(VtpruneError, match="batch_size must be an integer >= 1, 'auto'"):
            stub_lmms_eval.parse_batch_size(bad)
    cls = stub_lmms_eval.build_model_class()
    model = cls(pretrained="dummy", recipe="zspaprune", budget=8, batch_size="auto", max_batch_size=8)
    calls = []
    generate = model.backend.generate

    def limited(samples, *args, **kwargs):  # a device that fits 3 requests at once
        calls.append(len(samples))
        if len(samples) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return generate(samples, *args, **kwargs)

    model.backend.generate = limited
    docs = [{"q": "what color ?"}] * 10
    model.task_dict = {"t": {"test": docs}}
    visual = lambda doc: [torch.zeros(4, 4, 3, dtype=torch.uint8).numpy()]  # noqa: E731
    requests = [Instance("generate_until", ("<image> what color ?", {"max_new_tokens": 1}, visual, i, "t", "test"), i) for i in range(10)]
    answers = model.generate_until(requests)
    assert calls == [8, 4, 2, 2, 2, 2, 2] and model.batch_size_per_gpu == 2 and len(answers) == 10
    assert [a.sample.id for a in model.answered] == [f"t/test/{i}" for i in range(10)]
    fixed = cls(pretrained="dummy", recipe="zspaprune", budget=8, batch_size=8)
    fixed.backend.generate = lambda samples, *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("simulated"))
    fixed.task_dict = model.task_dict
    with pytest.raises(torch.OutOfMemoryError):  # a fixed batch size is never changed behind the user's back
        fixed.generate_until(requests)


def test_requests_with_different_gen_kwargs_are_batched_apart_and_answered_in_order(stub_lmms_eval) -> None:
    from lmms_eval.api.instance import Instance

    model = stub_lmms_eval.build_model_class()(pretrained="dummy", recipe="none", batch_size=4)
    seen = []
    generate = model.backend.generate

    def spy(samples, questions, handle, max_new_tokens, options=None, prompts=None):
        seen.append(([s.id for s in samples], max_new_tokens))
        return generate(samples, questions, handle, max_new_tokens, options, prompts)

    model.backend.generate = spy
    model.task_dict = {"t": {"test": [{}] * 5}}
    requests = [Instance("generate_until", ("q", {"max_new_tokens": 1 + i % 2}, None, i, "t", "test"), i) for i in range(5)]
    model.generate_until(requests)
    assert seen == [(["t/test/0", "t/test/2", "t/test/4"], 1), (["t/test/1", "t/test/3"], 2)]
    assert [a.sample.id for a in model.answered] == ["t/test/0", "t/test/2", "t/test/4", "t/test/1", "t/test/3"]
