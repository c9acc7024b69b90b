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
from .results import ResultsDir

__all__ = ["collect_rows", "write_report", "COLUMNS"]

COLUMNS: tuple[str, ...] = (
    "model", "task", "method", "budget", "seeds", "n_samples", "tokens_kept", "kept_ratio", "accuracy",
    "accuracy_ci95", "target_kept", "fidelity", "flops_ratio", "kv_ratio", "prefill_ms", "decode_ms_per_token",
)


def _mean(values: Sequence[Any]) -> Optional[float]:
    items = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    return sum(items) / len(items) if items else None


def collect_rows(root: Path | str) -> list[dict[str, Any]]:
    """Table rows from a results directory (finished cells only), unpruned rows first."""
    results = ResultsDir(root)
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for key, state in results.states().items():
        if state.get("status") != "done":
            continue
        config = state.get("config") or {}
        metrics = dict(state.get("metrics") or {})
        baseline_key = state.get("baseline_key")
        if baseline_key:
            value, count = fidelity(results.samples(key), results.samples(baseline_key))
            if count:
                metrics["fidelity"] = value
                metrics["fidelity_text"] = fidelity_text(results.samples(key), results.samples(baseline_key))[0]
        elif config.get("method") is None:
            metrics.setdefault("fidelity", 1.0)
            metrics.setdefault("fidelity_text", 1.0)
        model = (config.get("model") or {}).get("name", "?")
        task = (config.get("task") or {}).get("name", "?")
        budget = "-" if config.get("method") is None else config.get("budget")
        label = state.get("label") or ("unpruned" if config.get("method") is None else "?")
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
    rows.sort(key=lambda r: (r["model"], r["task"], r["method"] != "unpruned", r["method"], _budget_order(r["budget"])))
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
    header = "| " + " | ".join(COLUMNS) + " |"
    lines = [f"# vtprune report: {root}", "", header, "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_format(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    states = ResultsDir(root).states()
    failed = [s for s in states.values() if s.get("status") == "failed"]
    if failed:
        lines += ["", f"{len(failed)} failed cell(s):"] + [f"- `{s['key']}` {s.get('label', '')}: {s.get('error', '')}" for s in failed]
    written.update(_plots(rows, root, out, overlays))
    lines += [""] + [f"![{name}]({path.name})" for name, path in written.items() if path.suffix == ".png"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    written["markdown"] = out / "report.md"
    return written


def _plots(rows: Sequence[Mapping[str, Any]], root: Path, out: Path, overlays: int) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: dict[str, Path] = {}
    pairs = sorted({(r["model"], r["task"]) for r in rows})
    for x_key, x_label, name in (
        ("tokens_kept", "visual tokens kept (per sample)", "accuracy_vs_tokens"),
        ("flops_ratio", "prefill FLOPs (ratio to unpruned)", "accuracy_vs_flops"),
    ):
        figure, axes = plt.subplots(1, max(len(pairs), 1), figsize=(6 * max(len(pairs), 1), 4.2), squeeze=False)
        for axis, (model, task) in zip(axes[0], pairs):
            chosen = [r for r in rows if (r["model"], r["task"]) == (model, task)]
            by_method: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
            for row in chosen:
                by_method[row["method"]].append(row)
            methods = sorted(m for m in by_method if m != "unpruned")
            palette = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
            styles = {m: (palette(i % palette.N), ("-", "--", ":", "-.")[i // palette.N % 4]) for i, m in enumerate(methods)}
            for method, members in sorted(by_method.items()):
                points = sorted((m.get(x_key), m.get("accuracy")) for m in members if m.get(x_key) is not None and m.get("accuracy") is not None)
                if not points:
                    continue
                if method == "unpruned":
                    axis.axhline(points[0][1], color="black", linestyle="--", linewidth=1, label="unpruned")
                    axis.plot(*zip(*points), "k*", markersize=10)
                else:
                    colour, style = styles[method]
                    axis.plot(*zip(*points), marker="o", color=colour, linestyle=style, label=method)
            axis.set_xlabel(x_label)
            axis.set_ylabel("accuracy")
            axis.set_title(f"{task} / {Path(str(model)).name}", fontsize=9)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
        figure.tight_layout()
        path = out / f"{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written[name] = path
    montage = _overlay_montage(rows, root, out, overlays, plt)
    if montage is not None:
        written["kept_tokens"] = montage
    return written


def _overlay_montage(rows: Sequence[Mapping[str, Any]], root: Path, out: Path, limit: int, plt: Any) -> Optional[Path]:
    from PIL import Image

    results = ResultsDir(root)
    picks = []
    for row in rows:
        for key in row.get("keys", [])[:1]:
            images = sorted(results.overlay_dir(key).glob("*.png"))[:1]
            if images:
                picks.append((f"{row['method']} b={row['budget']}", images[0]))
    picks = picks[:limit]
    if not picks:
        return None
    columns = min(4, len(picks))
    lines = math.ceil(len(picks) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(3 * columns, 3.2 * lines), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (title, path) in zip(axes.flat, picks):
        axis.imshow(Image.open(path))
        axis.set_title(title, fontsize=7)
    figure.tight_layout()
    target = out / "kept_tokens.png"
    figure.savefig(target, dpi=110)
    plt.close(figure)
    return target
