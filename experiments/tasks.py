"""Evaluation tasks: the interface and the built-in tasks (`Sample`, `Task` and the answer metrics
live in `vtprune.experiments.samples` and are re-exported here).

A task is what a factory registered with ``registry.add_task(name, factory, description)``
returns (hook ``vtprune_register_tasks``). It has:

- ``samples(limit=None)``: yields `Sample` objects (deterministic order; ``limit`` = the first n);
- ``score(sample, prediction) -> dict[str, float]``: per-sample metrics; the first key (or the
  task's ``metric`` attribute) is the task accuracy;
- optionally ``max_new_tokens`` (int), the generation length the task needs, and
  ``prompt(sample) -> str``, the question text put in the model's prompt (default ``sample.question``);
- optionally ``selection_scores(sample, kept_indices) -> dict[str, float]``: metrics of what the
  pruning kept (``kept_indices``: per image, kept visual-token positions), merged into the scores;
- or, instead of samples/score, ``evaluate(context) -> dict[str, float]`` to run a whole external
  evaluation itself (see `LmmsEvalTask`).

Built-in: ``jsonl`` (bring your own data), ``synthetic`` (random images, for dry runs with the
``dummy`` model) and ``lmms_eval`` (benchmarks through lmms-eval).

>>> vqa_accuracy("Two", ["2", "two", "2", "3"])
1.0
>>> exact_match("the Red.", ["red"])
1.0
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from vtprune.framework.errors import VtpruneError
from vtprune.framework.typecheck import signature_problem

from .lmms_eval_run import evaluate_with_lmms_eval
from .results import read_jsonl
from .samples import METRICS, Sample, Task, contains, exact_match, normalize_answer, primary_metric, vqa_accuracy

__all__ = [
    "Sample",
    "Task",
    "JsonlTask",
    "SyntheticTask",
    "LmmsEvalTask",
    "METRICS",
    "normalize_answer",
    "exact_match",
    "vqa_accuracy",
    "contains",
    "primary_metric",
    "check_task_options",
]


def check_task_options(factory: Any, options: Mapping[str, Any]) -> Optional[str]:
    """Validate task options without building the task: the factory's signature, then its
    ``check_options(**options)`` classmethod/staticmethod when it has one (returns a sentence or None)."""
    problem = signature_problem(factory, options)
    if problem is None and hasattr(factory, "check_options"):
        problem = factory.check_options(**options)
    return problem


# ------------------------------------------------------------------------------------------------
# Built-in tasks
# ------------------------------------------------------------------------------------------------


class JsonlTask:
    """Your own data: one JSON object per line.

    Each line: ``{"id": ..., "image": "path" | ["p1", "p2"], "question": ..., "answers": [...] |
    "answer": ...}`` (other keys go to ``meta``). Image paths are relative to ``image_root``
    (default: the JSONL file's folder).

    Args:
        path: the JSONL file.
        metric: "vqa" (default), "exact_match" or "contains".
        image_root: folder of relative image paths.
        prompt_suffix: appended to every question (e.g. " Answer with one word.").
        max_new_tokens: generation length this task needs (overrides ``generation.max_new_tokens``).
    """

    def __init__(
        self,
        path: str,
        metric: str = "vqa",
        image_root: Optional[str] = None,
        prompt_suffix: str = "",
        max_new_tokens: Optional[int] = None,
    ) -> None:
        problem = self.check_options(path=path, metric=metric)
        if problem:
            raise VtpruneError(problem)
        self.path = Path(path)
        self.metric = metric
        self.image_root = Path(image_root) if image_root else self.path.parent
        self.prompt_suffix = prompt_suffix
        if max_new_tokens is not None:
            self.max_new_tokens = max_new_tokens

    @staticmethod
    def check_options(path: str = "", metric: str = "vqa", **_: Any) -> Optional[str]:
        if metric not in METRICS:
            return f"metric must be one of {', '.join(METRICS)}, got {metric!r}"
        if not Path(path).is_file():
            return f"no JSONL file at {path!r}"
        return None

    def samples(self, limit: Optional[int] = None) -> Iterator[Sample]:
        from PIL import Image

        for number, row in enumerate(read_jsonl(self.path)):
            if limit is not None and number >= limit:
                return
            paths = row.get("image", row.get("images", []))
            paths = [paths] if isinstance(paths, str) else list(paths)
            images = [Image.open(self.image_root / p).convert("RGB") for p in paths]
            answers = row.get("answers", row.get("answer", []))
            answers = [answers] if isinstance(answers, str) else [str(a) for a in answers]
            meta = {k: v for k, v in row.items() if k not in ("id", "image", "images", "question", "answers", "answer")}
            yield Sample(str(row.get("id", number)), images, str(row["question"]), answers, meta)

    def prompt(self, sample: Sample) -> str:
        return sample.question + self.prompt_suffix

    def score(self, sample: Sample, prediction: str) -> dict[str, float]:
        return {self.metric: METRICS[self.metric](prediction, sample.answers)}


class SyntheticTask:
    """Seeded random images with colour questions, for dry runs (``model.name: dummy``) and tests.

    Args:
        n: number of samples.
        size: image side in pixels.
        seed: the generator seed.
    """

    metric = "exact_match"

    def __init__(self, n: int = 16, size: int = 32, seed: int = 0) -> None:
        self.n, self.size, self.seed = n, size, seed

    def samples(self, limit: Optional[int] = None) -> Iterator[Sample]:
        colours = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230)}
        names = list(colours)
        count = self.n if limit is None else min(limit, self.n)
        for index in range(count):
            rng = np.random.default_rng(self.seed * 100_003 + index)
            name = names[int(rng.integers(len(names)))]
            image = rng.integers(90, 140, size=(self.size, self.size, 3)).astype(np.uint8)  # (H, W, 3)
            y, x = rng.integers(0, self.size // 2, size=2)
            image[y : y + self.size // 2, x : x + self.size // 2] = colours[name]
            yield Sample(f"syn-{index}", [image], "what color is the square ?", [name], {"index": index})

    def score(self, sample: Sample, prediction: str) -> dict[str, float]:
        return {"exact_match": exact_match(prediction, sample.answers)}


class LmmsEvalTask:
    """Benchmarks through lmms-eval (docs/experiments.md#lmms-eval): GQA, POPE, TextVQA, ...

    The cell's already-loaded model and pruning pipeline run inside lmms-eval's evaluator as the
    ``vtprune`` model (`vtprune.experiments.lmms_eval_model`); the task's metrics become the cell's
    metrics (``<task>/<metric>``), and per-sample rows (tokens, FLOPs, KV bytes, latency, the
    answer fidelity compares) are written like any task's (`vtprune.experiments.lmms_eval_run`).

    Args:
        tasks: lmms-eval task names.
        num_fewshot, gen_kwargs: passed to ``lmms_eval.evaluator.simple_evaluate``
            (``gen_kwargs``: ``"temperature=0.7,do_sample=True"``; unsupported keys raise).
        log_samples: kept for older grid files (per-sample logs are always collected).
        metric: the ``<task>/<metric>`` reported as accuracy (default: the first one).
        include_path: a folder (or list of folders) of local lmms-eval task yamls.
        apply_chat_template: render the contexts with the processor's chat template (lmms-eval's
            ``--apply_chat_template``).
        batch_size: requests per batch, ``"auto"`` or ``"auto:N"`` (default: ``generation.batch_size``).
        max_frames_num: frames sampled uniformly from each video visual (default 32, lmms-eval's
            ``llava_onevision`` default; `vtprune.experiments.video`).
    """

    def __init__(
        self,
        tasks: Sequence[str] = ("gqa",),
        num_fewshot: Optional[int] = None,
        gen_kwargs: str = "",
        log_samples: bool = True,
        metric: Optional[str] = None,
        include_path: Optional[str | list[str]] = None,
        apply_chat_template: bool = False,
        batch_size: Optional[int | str] = None,
        max_frames_num: int = 32,
    ) -> None:
        problem = self.check_options(include_path=include_path, batch_size=batch_size, max_frames_num=max_frames_num)
        if problem:
            raise VtpruneError(problem)
        self.tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        self.num_fewshot, self.gen_kwargs, self.log_samples = num_fewshot, gen_kwargs, log_samples
        self.metric = metric
        self.include_path = include_path
        self.apply_chat_template = apply_chat_template
        self.batch_size = batch_size
        self.max_frames_num = max_frames_num

    @staticmethod
    def check_options(
        include_path: Optional[str | list[str]] = None, batch_size: Any = None, max_frames_num: Any = 32, **_: Any
    ) -> Optional[str]:
        folders = [include_path] if isinstance(include_path, str) else list(include_path or [])
        missing = [f for f in folders if not Path(f).is_dir()]
        if missing:
            return f"include_path: no such folder {', '.join(repr(str(m)) for m in missing)} (a folder of lmms-eval task yamls)"
        if isinstance(max_frames_num, bool) or not isinstance(max_frames_num, int) or max_frames_num < 1:
            return f"max_frames_num must be an integer >= 1 (frames sampled per video), got {max_frames_num!r}"
        if batch_size is not None:
            from .lmms_eval_model import parse_batch_size

            try:
                parse_batch_size(batch_size)
            except VtpruneError as error:
                return str(error)
        return None

    def evaluate(self, context: Any) -> dict[str, float]:
        """Run lmms-eval with the cell's model; ``context`` is a `vtprune.experiments.runner.CellContext`."""
        return evaluate_with_lmms_eval(self, context)


def jsonl_lines(rows: Sequence[Mapping[str, Any]]) -> str:
    """JSONL text for ``rows`` (used by docs and tests to make a JsonlTask file)."""
    return "".join(json.dumps(dict(row)) + "\n" for row in rows)
