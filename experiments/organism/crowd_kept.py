"""What zspaprune keeps on the crowd task, by critical count (docs/demo.md, "The third task: crowd").

Usage::

    python -m vtprune.experiments.organism.crowd_kept --n 500 [--split test]

Contract
--------
* ``kept_composition(model, processor, samples, budget, critical)``: answers ``samples`` with
  ``zspaprune+split(critical=critical / budget)`` at ``budget`` tokens and returns a `Composition`: the
  accuracy and the mean number of kept tokens per row that are crowd members, distractors of the crowd's
  shape, objects of another shape, and background (``patch_labels`` -1).
* The CLI prints one line per ``(budget, critical)`` of ``SETTINGS`` on the crowd split (``weights_clutter/``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from vtprune.framework import compose
from vtprune.framework.prune import prune

from .evaluate import answer
from .split_oracle import PROMPT_STOP
from .task import Sample

__all__ = ["SETTINGS", "Composition", "kept_composition", "main"]

SETTINGS: tuple[tuple[int, int], ...] = ((6, 0), (6, 4), (12, 0), (12, 7), (12, 10))


@dataclass(frozen=True)
class Composition:
    """Accuracy and the mean kept tokens per row of each kind (module doc)."""

    accuracy: float
    crowd: float
    same_shape: float
    other_shape: float
    background: float


class _KeptRecorder:
    """A pipeline proxy that records the kept token indices of every row it selects for."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.kept: list[list[int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipeline, name)

    def select(self, signals: Any, budget: Any) -> Any:
        selection = self.pipeline.select(signals, budget)
        for row in range(selection.indices.shape[0]):
            self.kept.append(selection.indices[row][selection.mask[row]].tolist())  # the row's kept positions
        return selection


def kept_composition(model: Any, processor: Any, samples: Sequence[Sample], budget: int, critical: int) -> Composition:
    """Answer ``samples`` with ``critical`` of ``budget`` tokens critical and count what was kept (module doc)."""
    stop = processor.tokenizer(PROMPT_STOP, add_special_tokens=False)["input_ids"]
    pipe = _KeptRecorder(compose(f"zspaprune+split(critical={critical / budget!r})"))
    with prune(model, pipe, budget=budget, prompt_stop=stop):
        predictions = answer(model, processor, samples)
    counts = np.zeros((len(samples), 4))  # (S, 4): crowd, same shape, other shape, background
    for row, (kept, sample) in enumerate(zip(pipe.kept, samples, strict=True)):
        for token in kept:
            label = int(sample.patch_labels[token])
            if label < 0:
                counts[row, 3] += 1
            elif label in sample.target_objects:
                counts[row, 0] += 1
            elif sample.objects[label].shape == sample.answer:
                counts[row, 1] += 1
            else:
                counts[row, 2] += 1
    correct = np.array(predictions) == np.array([s.answer for s in samples])
    return Composition(float(correct.mean()), *(float(v) for v in counts.mean(axis=0)))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (module doc)."""
    ap = argparse.ArgumentParser(prog="python -m vtprune.experiments.organism.crowd_kept")
    ap.add_argument("--split", default="test", choices=("validation", "test"))
    ap.add_argument("--n", type=int, default=500)
    a = ap.parse_args(argv)
    from . import WEIGHTS_DIR, load_organism
    from .crowd import make_crowd_split

    torch.set_num_threads(1)
    model, processor = load_organism(path=WEIGHTS_DIR.parent / "weights_clutter")
    samples = make_crowd_split(a.split, a.n)
    print(f"crowd {a.split}, {a.n} questions, mean crowd size {np.mean([len(s.target_objects) for s in samples]):.2f}")
    for budget, critical in SETTINGS:
        c = kept_composition(model, processor, samples, budget, critical)
        print(f"budget {budget} critical {critical}: accuracy {c.accuracy:.3f}; kept crowd {c.crowd:.2f}, same-shape "
              f"distractors {c.same_shape:.2f}, other-shape objects {c.other_shape:.2f}, background {c.background:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
