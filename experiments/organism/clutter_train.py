"""Training glue for the ``clutter`` task: which batches, which start, which evaluation split.

Contract
--------
* ``TASKS``: the organism tasks ``vtprune organism train --task`` accepts: ``"shapes"`` (the
  original task, trained from scratch: the shipped ``weights/``) and ``"clutter"``.
* ``task_overrides(task) -> dict``: what the task changes in ``TrainConfig``'s defaults (``train.parse_args``
  applies them). ``shapes``: nothing (the defaults reproduce ``weights/``). ``clutter``: a
  fine-tune of the shipped weights (``init="shipped"``) on *mixed* batches (clutter scenes at
  even, shapes scenes at odd scene indices, so the original task is rehearsed), with
  ``CLUTTER_OVERRIDES``; it reproduces ``weights_clutter/``.
* ``batch_task(task)``: the ``TrainBatcher`` task of a training task (``clutter`` -> ``mixed``).
* ``initial_model(init)``: the model a run starts from (``"shipped"`` or a weights folder).
* ``task_split(task, split, n)``: the evaluation samples of a task.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .clutter import make_clutter_split
from .task import Sample, make_split

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration

__all__ = ["CLUTTER_OVERRIDES", "TASKS", "batch_task", "initial_model", "task_overrides", "task_split"]

TASKS: tuple[str, ...] = ("shapes", "clutter")
CLUTTER_OVERRIDES: dict[str, object] = {
    "init": "shipped",
    "steps": 400,
    "lr": 1e-3,
    "warmup": 50,
    "ckpt_every": 100,
    "eval_every": 100,
    "n_val": 150,
    "n_test": 1000,
}


def _check(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown organism task {task!r}; expected one of {list(TASKS)}")
    return task


def task_overrides(task: str) -> dict[str, object]:
    """The ``TrainConfig`` fields ``vtprune organism train --task TASK`` changes from their defaults."""
    return {} if _check(task) == "shapes" else {"task": task, **CLUTTER_OVERRIDES}


def batch_task(task: str) -> str:
    """``TrainBatcher`` task of a training task: clutter fine-tunes on mixed clutter + shapes batches."""
    return {"shapes": "shapes", "clutter": "mixed"}[_check(task)]


def initial_model(init: str) -> "LlavaForConditionalGeneration":
    """The fp32 model a fine-tune starts from: ``"shipped"`` (``weights/``) or a weights folder."""
    from transformers import LlavaForConditionalGeneration

    from . import WEIGHTS_DIR

    root = WEIGHTS_DIR if init == "shipped" else Path(init)
    if not (root / "config.json").exists():
        raise FileNotFoundError(f"no organism weights to start from in {root} (init={init!r}; use 'shipped' or a folder)")
    return LlavaForConditionalGeneration.from_pretrained(root, dtype=torch.float32)


def task_split(task: str, split: str, n: int) -> list[Sample]:
    """``n`` evaluation samples of ``task`` from ``split``."""
    return make_split(split, n) if _check(task) == "shapes" else make_clutter_split(split, n)
