"""The automatic-split table of docs/demo.md from per-row split oracles (fast path of auto_split.yaml).

Usage::

    python -m vtprune.experiments.organism.split_table --split test --n 500 --out DIR

Contract
--------
* For each task (``shapes`` on ``weights/``, ``clutter`` and ``crowd`` on ``weights_clutter/``) and budget it runs
  ``split_oracle.split_outcomes`` once (one pass per critical count) and the diversity-only recipe
  once, saving ``DIR/{task}_{budget}.npz``; a rerun reuses saved files.
* ``split_rows(correct, scores, budget)``: the accuracy and 95% normal half-interval of every fixed
  split, ``dynamic``, the ``auto`` stage's mass rule and ``zspaprune_auto``'s allocator (row ``auto``), evaluated exactly as ``correct[row, c(row)]`` with ``c`` from the
  allocators' own ``allocate`` on the recorded scores (a row's selection depends on its signals and
  ``c`` only), plus the chosen ``auto`` counts.
* Prints one markdown table per task and the distribution of ``auto``'s critical counts.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtprune.framework import compose
from vtprune.strategies.budget import AutoSplit, DynamicSplit, FixedSplit

__all__ = ["BUDGETS", "RATIOS", "TASK_WEIGHTS", "auto_allocator", "interval", "main", "split_rows"]

BUDGETS: tuple[int, ...] = (4, 6, 12)
RATIOS: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
TASK_WEIGHTS: dict[str, str] = {"shapes": "weights", "clutter": "weights_clutter", "crowd": "weights_clutter"}
Z95 = 1.959963984540054  # two-sided 95% normal quantile


def interval(correct: np.ndarray) -> tuple[float, float]:
    """(accuracy, 95% normal-approximation half width) of a bool vector."""
    p = float(np.mean(correct))
    return p, Z95 * float(np.sqrt(p * (1 - p) / len(correct)))


def _counts(allocator: Any, scores: np.ndarray, budget: int) -> np.ndarray:
    s = torch.from_numpy(scores)  # (S, N)
    totals = torch.full((s.shape[0],), budget)  # (S,)
    return allocator.allocate(totals, torch.ones_like(s, dtype=torch.bool), s).critical.numpy()


def auto_allocator() -> Any:
    """The allocator stage of the ``zspaprune_auto`` preset (``gap`` with its defaults)."""
    return compose("zspaprune_auto").budget


def split_rows(correct: np.ndarray, scores: np.ndarray, budget: int, auto: Any = None) -> tuple[dict, np.ndarray]:
    """({name: (accuracy, half width)}, auto's critical counts) for one (task, budget) oracle.

    ``auto``: the allocator of the ``auto`` row (default: ``zspaprune_auto``'s); the ``mass rule`` row is the
    ``auto`` allocator stage with its defaults (the first rule of issue 18, kept for comparison).
    """
    auto = auto_allocator() if auto is None else auto
    rows = np.arange(len(correct))
    out = {f"critical {r}": interval(correct[rows, _counts(FixedSplit(critical=r), scores, budget)]) for r in RATIOS}
    out["dynamic"] = interval(correct[rows, _counts(DynamicSplit(), scores, budget)])
    out["mass rule (auto stage)"] = interval(correct[rows, _counts(AutoSplit(), scores, budget)])
    chosen = _counts(auto, scores, budget)
    out["auto"] = interval(correct[rows, chosen])
    return out, chosen


def _oracle(task: str, split: str, n: int, budget: int, out: Path) -> dict[str, np.ndarray]:
    path = out / f"{task}_{budget}.npz"
    if path.exists():
        return dict(np.load(path))
    from . import WEIGHTS_DIR, load_organism
    from .split_oracle import chosen_critical_counts, split_outcomes
    from .vqa_task import organism_split

    model, processor = load_organism(path=WEIGHTS_DIR.parent / TASK_WEIGHTS[task])
    samples = organism_split(task, split, n)
    res = split_outcomes(model, processor, samples, budget)
    _, diversity = chosen_critical_counts(model, processor, samples, budget, recipe="relevance.none+fps")
    data = {"correct": res.correct, "scores": res.scores, "diversity_only": diversity}
    np.savez(path, **data)
    return data


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (module doc)."""
    ap = argparse.ArgumentParser(prog="python -m vtprune.experiments.organism.split_table")
    ap.add_argument("--split", default="test", choices=("validation", "test"))
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--out", required=True, help="folder for the per-(task, budget) oracles")
    ap.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    ap.add_argument("--tasks", nargs="+", default=list(TASK_WEIGHTS), choices=list(TASK_WEIGHTS))
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    auto = auto_allocator()
    for task in a.tasks:
        table: dict[int, dict] = {}
        for budget in a.budgets:
            data = _oracle(task, a.split, a.n, budget, out)
            rows, chosen = split_rows(data["correct"], data["scores"], budget, auto)
            rows["diversity only"] = interval(data["diversity_only"])
            table[budget] = rows
            dist = ", ".join(f"{c}: {k}" for c, k in sorted(Counter(chosen.tolist()).items()))
            print(f"{task} {budget} tokens: auto critical counts {{{dist}}}")
        print(f"\n| {task} ({a.split}, n={a.n}) | " + " | ".join(f"{b} tokens" for b in a.budgets) + " |")
        print("|---" * (len(a.budgets) + 1) + "|")
        for name in table[a.budgets[0]]:
            cells = " | ".join(f"{table[b][name][0]:.3f} +- {table[b][name][1]:.3f}" for b in a.budgets)
            print(f"| {name} | {cells} |")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
