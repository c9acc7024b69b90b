"""The experiment subcommands of ``vtprune``: ``run``, ``plan``, ``report``.

::

    vtprune plan GRID.yaml [key=value ...]              # the cells, their status and count; runs nothing
    vtprune run GRID.yaml [key=value ...] [--retry-failed] [--rerun-stale]   (flags and overrides in any order)
    vtprune report RESULTS_DIR [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_experiment_commands", "cell_status"]


def add_experiment_commands(commands: Any) -> None:
    """Add ``run``, ``plan`` and ``report`` to the ``vtprune`` subparsers."""
    overrides_help = "dotted overrides: budget=32, grid.budget=[16,32], task.limit=10, tracking.mode=disabled"
    run = commands.add_parser("run", help="run an ablation grid (resumable)", description=_cmd_run.__doc__)
    run.add_argument("grid", help="grid YAML file (or the name of a shipped one, e.g. zspaprune_ratio)")
    run.add_argument("overrides", nargs="*", help=overrides_help)
    run.add_argument("--retry-failed", action="store_true", help="run failed cells again (default: keep their failure)")
    run.add_argument("--rerun-stale", action="store_true", help="run again the finished cells that ran with other vtprune / plugin versions (default: keep them, listed as stale)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--no-plugins", action="store_true", help="skip third-party entry points")
    run.set_defaults(func=_cmd_run)

    plan = commands.add_parser("plan", help="validate a grid and print its cells; runs nothing", description=_cmd_plan.__doc__)
    plan.add_argument("grid")
    plan.add_argument("overrides", nargs="*", help=overrides_help)
    plan.add_argument("--no-plugins", action="store_true", help="skip third-party entry points")
    plan.set_defaults(func=_cmd_plan)

    report = commands.add_parser("report", help="table (markdown + CSV) and plots of a results directory")
    report.add_argument("results", help="the grid's output_dir")
    report.add_argument("--out", help="where to write (default RESULTS/report)")
    report.add_argument("--wide", action="store_true", help="also print the table of every metric (always in report.md / report.csv)")
    report.set_defaults(func=_cmd_report)


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from vtprune.framework.registry import build_registry, default_registry

    from .config import load_grid

    registry = build_registry(autoload=False) if args.no_plugins else default_registry()
    return load_grid(args.grid, args.overrides, registry=registry), registry


def _cmd_plan(args: argparse.Namespace) -> int:
    """Validate the grid (every problem at once) and print each cell with its key and status."""
    from .results import ResultsDir
    from .runner import stale_cells

    spec, _ = _load(args)
    results = ResultsDir(spec.output_dir)
    states = results.states()
    baselines = sum(cell.is_baseline for cell in spec.cells)
    print(f"grid {spec.name!r} ({spec.source}) -> {spec.output_dir}")
    stale = stale_cells(spec, states)
    for number, cell in enumerate(spec.cells):
        status = cell_status(results, cell, states) + (" (stale)" if cell.key in stale else "")
        print(f"  {number:>3}  {cell.key}  {status:<16}  {cell.label:<32}  {cell.describe()}")
    todo = sum(states.get(c.key, {}).get("status") != "done" for c in spec.cells)
    print(f"{len(spec.cells)} cells ({baselines} unpruned baseline{'s' if baselines != 1 else ''}), {todo} to run")
    if stale:
        print(f"{len(stale)} finished cell(s) ran with other versions; `vtprune run ... --rerun-stale` runs them again")
    return 0


def cell_status(results: Any, cell: Any, states: Any) -> str:
    """``done``, ``failed``, ``partial (n of m)`` (samples written, cell not finished; ``m`` is
    ``task.limit``, else ``partial (n answered)``) or ``todo``."""
    status = (states.get(cell.key) or {}).get("status")
    if status in ("done", "failed"):
        return status
    answered = len(results.samples(cell.key))
    if not answered:
        return "todo"
    limit = cell.config["task"].get("limit")
    return f"partial ({answered} of {limit})" if limit else f"partial ({answered} answered)"


def _cmd_run(args: argparse.Namespace) -> int:
    """Run every unfinished cell of the grid; finished cells are skipped, failures recorded."""
    from .runner import run_grid

    spec, registry = _load(args)
    progress = not args.no_progress and sys.stderr.isatty()  # a log file gets one line per cell
    summary = run_grid(spec, retry_failed=args.retry_failed, registry=registry, progress=progress, rerun_stale=args.rerun_stale)
    print(summary.format(spec))
    return 1 if summary.failed else 0


def _cmd_report(args: argparse.Namespace) -> int:
    """Write report.md, report.csv and the PNG plots."""
    from pathlib import Path

    from vtprune.framework.errors import VtpruneError

    from .report import write_report

    if not (Path(args.results) / "cells.jsonl").exists():
        raise VtpruneError(f"{args.results} has no cells.jsonl: pass the output_dir of a grid run")
    written = write_report(args.results, args.out)
    text = Path(written["markdown"]).read_text().split("\n![")[0]
    print((text if args.wide else text.split("\n## All metrics")[0]).rstrip())
    print("\nwritten: " + ", ".join(str(p) for p in written.values()), file=sys.stderr)
    return 0
