"""Choose the ``gap`` allocator's four constants on the validation oracles (issue 18; docs/demo.md).

Usage::

    python -m vtprune.experiments.organism.split_table --split validation --n 600 --out DIR
    python -m vtprune.experiments.organism.split_tune DIR

Contract
--------
* Reads the per-(task, budget) oracles ``DIR/{task}_{budget}.npz`` that ``split_table`` saves (``correct``
  (S, budget + 1) bool, ``scores`` (S, N)) for every task of ``split_table.TASK_WEIGHTS`` and budget of
  ``split_table.BUDGETS`` (validation questions only: never point it at a test folder when tuning).
* For every ``(drop, reserve, window, extend)`` of the grid it evaluates ``GapSplit(...)`` exactly
  (``correct[row, c(row)]``, as ``split_table.split_rows``) and scores the setting by, in this order: the
  worst gap to the best fixed ratio (``split_table.RATIOS``) over the cells, the worst shortfall below the
  fixed 0.6 split, then the mean gap (all lower is better).
* ``rank_settings(oracles, temperatures, trades) -> list[Setting]``: every setting, best first.
* Prints the best settings and, per cell, the best fixed ratio, 0.6 and the best setting's accuracy.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vtprune.strategies.budget import FixedSplit, GapSplit

from .split_table import BUDGETS, RATIOS, TASK_WEIGHTS, _counts

__all__ = ["DROPS", "EXTENDS", "RESERVES", "WINDOWS", "Setting", "load_oracles", "main", "rank_settings"]

DROPS: tuple[float, ...] = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5)
RESERVES: tuple[int, ...] = (0, 1, 2, 3)
WINDOWS: tuple[int, ...] = (4, 8, 12, 16, 24, 32)
EXTENDS: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0, 3.0)
ZSPAPRUNE_RATIO = 0.6  # the paper's fixed split (the `zspaprune` preset)


@dataclass(frozen=True)
class Setting:
    """One ``(drop, reserve, window, extend)`` and its scores over the cells (gaps are best fixed minus auto)."""

    drop: float
    reserve: int
    window: int
    extend: float
    worst_gap: float
    worst_below_fixed: float
    mean_gap: float
    accuracy: dict[tuple[str, int], float]

    @property
    def key(self) -> tuple[float, float, float]:
        return (round(self.worst_gap, 9), round(self.worst_below_fixed, 9), round(self.mean_gap, 9))


def load_oracles(folder: Path, tasks: tuple[str, ...] = tuple(TASK_WEIGHTS),
                 budgets: tuple[int, ...] = BUDGETS) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """``{(task, budget): {"correct", "scores"}}`` from ``split_table``'s saved oracles."""
    out = {}
    for task in tasks:
        for budget in budgets:
            path = folder / f"{task}_{budget}.npz"
            if not path.exists():
                raise FileNotFoundError(f"no oracle {path}; run split_table --out {folder} first")
            data = np.load(path)
            out[(task, budget)] = {"correct": data["correct"], "scores": data["scores"]}
    return out


def _accuracy(oracle: dict[str, np.ndarray], allocator: object, budget: int) -> float:
    correct = oracle["correct"]
    return float(np.mean(correct[np.arange(len(correct)), _counts(allocator, oracle["scores"], budget)]))


def rank_settings(oracles: dict[tuple[str, int], dict[str, np.ndarray]], drops: tuple[float, ...] = DROPS,
                  reserves: tuple[int, ...] = RESERVES, windows: tuple[int, ...] = WINDOWS,
                  extends: tuple[float, ...] = EXTENDS) -> list[Setting]:
    """Every setting of the grid scored on ``oracles`` (module doc), best first (a stable sort: ties keep grid order)."""
    fixed = {cell: {r: _accuracy(o, FixedSplit(critical=r), cell[1]) for r in RATIOS} for cell, o in oracles.items()}
    settings = []
    for drop in drops:
        for reserve in reserves:
            for window in windows:
                for extend in extends:
                    allocator = GapSplit(drop=drop, reserve=reserve, window=window, extend=extend)
                    acc = {cell: _accuracy(o, allocator, cell[1]) for cell, o in oracles.items()}
                    gaps = [max(fixed[c].values()) - acc[c] for c in oracles]
                    below = [fixed[c][ZSPAPRUNE_RATIO] - acc[c] for c in oracles]
                    settings.append(Setting(drop, reserve, window, extend, max(gaps), max(0.0, max(below)),
                                            float(np.mean(gaps)), acc))
    return sorted(settings, key=lambda s: s.key)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (module doc)."""
    ap = argparse.ArgumentParser(prog="python -m vtprune.experiments.organism.split_tune")
    ap.add_argument("folder", help="split_table's --out folder of VALIDATION oracles")
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args(argv)
    oracles = load_oracles(Path(a.folder))
    ranked = rank_settings(oracles)
    print("drop reserve window extend | worst gap | worst below 0.6 | mean gap")
    for s in ranked[: a.top]:
        print(f"{s.drop:4.3g} {s.reserve:7d} {s.window:6d} {s.extend:6.3g} | {s.worst_gap:9.4f} | "
              f"{s.worst_below_fixed:15.4f} | {s.mean_gap:8.4f}")
    best = ranked[0]
    print(f"\nper cell (best setting: drop {best.drop:g}, reserve {best.reserve}, window {best.window}, "
          f"extend {best.extend:g}):")
    for cell, oracle in oracles.items():
        fixed = {r: _accuracy(oracle, FixedSplit(critical=r), cell[1]) for r in RATIOS}
        top = max(fixed, key=fixed.get)
        print(f"  {cell[0]:8s} {cell[1]:3d} tokens: best fixed {top} {fixed[top]:.3f}, 0.6 {fixed[ZSPAPRUNE_RATIO]:.3f}, "
              f"auto {best.accuracy[cell]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
