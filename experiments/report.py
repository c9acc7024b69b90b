"""``vtprune report RESULTS_DIR``: a method x budget table (markdown + CSV) and plots (PNG).

Rows: one per (model, task, method, budget), averaged over seeds, plus the unpruned row of each
(model, task). Fidelity is recomputed from the per-sample files, so it is right even when the
unpruned run finished after a cell (cluster runs). Plots (matplotlib, Agg backend): accuracy vs
visual tokens kept per method, accuracy vs prefill FLOPs (ratio to unpruned), and a montage of
kept-token overlays.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .metrics import fidelity, fidelity_text
from .plots import write_plots
from .results import ResultsDir

__all__ = ["collect_rows", "write_report", "budget_table", "COLUMNS"]

COLUMNS: tuple[str, ...] = (
    "model", "task", "method", "budget", "seeds", "n_samples", "tokens_kept", "kept_ratio", "accuracy",
    "accuracy_ci95", "target_kept", "fidelity", "flops_ratio", "kv_ratio", "prefill_ms", "decode_ms_per_token",
)


def _mean(values: Sequence[Any]) -> Optional[float]:
    items = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    return sum(items) / len(items) if items else None


def _task_labels(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Each config's task label: its task name, plus ``(option=value, ...)`` for the task options whose values differ
    between the configs of that task name (a grid over ``task.options.scenes`` gets one table per scene set; a grid
    over one task keeps the plain name)."""
    tasks = [config.get("task") or {} for config in configs]
    values: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for task in tasks:
        for option, value in (task.get("options") or {}).items():
            values[task.get("name", "?")][option].add(repr(value))
    labels = []
    for task in tasks:
        name = task.get("name", "?")
        options = task.get("options") or {}
        varying = [o for o in sorted(values[name]) if len(values[name][o]) > 1]
        labels.append(f"{name} ({', '.join(f'{o}={options.get(o)}' for o in varying)})" if varying else name)
    return labels


def collect_rows(root: Path | str) -> list[dict[str, Any]]:
    """Table rows from a results directory (finished cells only): per (model, task), the unpruned
    row first, then methods in the grid's order (first appearance in ``cells.jsonl``), budgets
    from large to small. Tasks are told apart by name and by the task options that vary in the grid
    (`_task_labels`)."""
    results = ResultsDir(root)
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    order: dict[str, int] = {}  # method -> first appearance in cells.jsonl (the grid's order)
    done = [(key, state) for key, state in results.states().items() if state.get("status") == "done"]
    task_labels = _task_labels([state.get("config") or {} for _, state in done])
    for (key, state), task in zip(done, task_labels):
        config = state.get("config") or {}
        metrics = dict(state.get("metrics") or {})
        baseline_key = state.get("baseline_key")
        if baseline_key:
            rows, reference = results.samples(key), results.samples(baseline_key)  # each file read once
            value, count = fidelity(rows, reference)
            if count:
                metrics["fidelity"] = value
                metrics["fidelity_text"] = fidelity_text(rows, reference)[0]
        elif config.get("method") is None:
            metrics.setdefault("fidelity", 1.0)
            metrics.setdefault("fidelity_text", 1.0)
        model = (config.get("model") or {}).get("name", "?")
        budget = "-" if config.get("method") is None else config.get("budget")
        label = state.get("label") or ("unpruned" if config.get("method") is None else "?")
        order.setdefault(label, len(order))
        groups[(model, task, label, str(budget))].append({"metrics": metrics, "seed": config.get("seed"), "key": key, "budget": budget})
    rows = []
    for (model, task, label, _), members in groups.items():
        row: dict[str, Any] = {
            "model": model, "task": task, "method": label, "budget": members[0]["budget"],
            "seeds": len({m["seed"] for m in members}), "keys": [m["key"] for m in members],
        }
        names = {k for m in members for k in m["metrics"]}
        for name in sorted(names):
            row[name] = _mean([m["metrics"].get(name) for m in members])
        row["target_kept"] = row.get("score/target_kept")
        row["accuracy_ci95"] = _ci95(row.get("accuracy"), sum(int(m["metrics"].get("n_samples") or 0) for m in members))
        rows.append(row)
    rows.sort(key=lambda r: (r["model"], r["task"], r["method"] != "unpruned", order[r["method"]], -_budget_order(r["budget"])))
    return rows


def _ci95(accuracy: Optional[float], n: int) -> Optional[float]:
    """Half-width of the 95% normal-approximation interval of an accuracy over ``n`` answers."""
    if accuracy is None or n <= 0:
        return None
    return 1.96 * math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / n)


def _budget_order(budget: Any) -> float:
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return float(budget)
    return -1.0


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _accuracy(row: Mapping[str, Any]) -> str:
    accuracy, interval = row.get("accuracy"), row.get("accuracy_ci95")
    if accuracy is None:
        return ""
    return f"{accuracy:.3f}" + (f" ± {interval:.3f}" if interval else "")


def _budget_name(budget: Any) -> str:
    if isinstance(budget, float):
        return f"{budget:.0%}"
    return f"{budget} tokens" if isinstance(budget, int) else str(budget)


def budget_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The README's view, as markdown lines: per (model, task) a heading, then one row per method
    (unpruned first, then the grid's order) and one column per budget (large to small), each cell
    the accuracy ± its 95% interval half-width."""
    lines: list[str] = []
    for model, task in dict.fromkeys((r["model"], r["task"]) for r in rows):
        chosen = [r for r in rows if (r["model"], r["task"]) == (model, task)]
        budgets = sorted({r["budget"] for r in chosen if r["method"] != "unpruned"}, key=_budget_order, reverse=True)
        methods = list(dict.fromkeys(r["method"] for r in chosen))
        cells = {(r["method"], r["budget"]): r for r in chosen}
        lines += [f"## {task}: {model}", "", "| method | all tokens | " + " | ".join(_budget_name(b) for b in budgets) + " |"]
        lines.append("|---" * (len(budgets) + 2) + "|")
        for method in methods:
            if method == "unpruned":
                row = next(r for r in chosen if r["method"] == "unpruned")
                lines.append(f"| unpruned | {_accuracy(row)} |" + " |" * len(budgets))
                continue
            seeds = max((r.get("seeds") or 1) for r in chosen if r["method"] == method)
            name = f"{method} ({seeds} seeds)" if seeds > 1 else method
            values = [_accuracy(cells[(method, b)]) if (method, b) in cells else "" for b in budgets]
            lines.append(f"| {name} | | " + " | ".join(values) + " |")
        lines.append("")
    return lines[:-1] if lines else ["(no finished cells)"]


def _grid_name(root: Path) -> str:
    """The grid's name from ``grid.yaml`` (else the folder's name)."""
    import yaml

    try:
        data = yaml.safe_load((root / "grid.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        data = {}
    return str(data.get("name") or root.name) if isinstance(data, dict) else root.name


def write_report(root: Path | str, out: Optional[Path | str] = None, overlays: int = 8) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv`` and the plots into ``out`` (default ``ROOT/report``);
    returns the written paths by name."""
    root = Path(root)
    out = Path(out) if out else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = collect_rows(root)
    written: dict[str, Path] = {}
    with open(out / "report.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c) for c in COLUMNS})
    written["csv"] = out / "report.csv"
    title = _grid_name(root)
    header = "| " + " | ".join(COLUMNS) + " |"
    lines = [f"# vtprune report: {title}", "", f"Results: `{root}`; every metric per row: `report.csv` and the table below.", ""]
    lines += budget_table(rows)
    lines += ["", "## All metrics", "", header, "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_format(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    states = ResultsDir(root).states()
    failed = [s for s in states.values() if s.get("status") == "failed"]
    if failed:
        lines += ["", f"{len(failed)} failed cell(s):"] + [f"- `{s['key']}` {s.get('label', '')}: {s.get('error', '')}" for s in failed]
    written.update(write_plots(rows, root, out, overlays, title))
    lines += [""] + [f"![{name}]({path.name})" for name, path in written.items() if path.suffix == ".png"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    written["markdown"] = out / "report.md"
    return written
