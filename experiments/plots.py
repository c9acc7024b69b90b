"""The report's plots (matplotlib, Agg backend): accuracy against visual tokens kept and against
prefill FLOPs, and a montage of kept-token overlays.

Accuracy plots use a log x axis (small budgets are not squeezed against the unpruned point) and
give every method its own marker and line style, so identical curves stay visible. The montage
shows the grid's methods at one budget on the same images (one row per method).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .results import ResultsDir

__all__ = ["write_plots", "MARKERS"]

MARKERS: tuple[str, ...] = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "h", "p", "*")
"""Markers cycled over the methods of a plot."""

_LINES = ("-", "--", ":", "-.")


def write_plots(rows: Sequence[Mapping[str, Any]], root: Path, out: Path, overlays: int, title: str) -> dict[str, Path]:
    """Write the plots of a report's ``rows`` into ``out``; returns the written paths by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: dict[str, Path] = {}
    pairs = list(dict.fromkeys((r["model"], r["task"]) for r in rows))
    for x_key, x_label, name in (
        ("tokens_kept", "visual tokens kept per sample (log scale)", "accuracy_vs_tokens"),
        ("flops_ratio", "prefill FLOPs, ratio to unpruned (log scale)", "accuracy_vs_flops"),
    ):
        figure, axes = plt.subplots(1, max(len(pairs), 1), figsize=(6.5 * max(len(pairs), 1), 4.4), squeeze=False)
        for axis, (model, task) in zip(axes[0], pairs):
            _accuracy_axis(axis, [r for r in rows if (r["model"], r["task"]) == (model, task)], x_key, plt)
            axis.set_xlabel(x_label)
            axis.set_ylabel("accuracy")
            heading = f"{title}: {task}" + (f" ({Path(str(model)).name})" if len(pairs) > 1 else "")
            axis.set_title(heading, fontsize=9)
        figure.tight_layout()
        path = out / f"{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written[name] = path
    montage = _overlay_montage(rows, root, out, overlays, plt)
    if montage is not None:
        written["kept_tokens"] = montage
    return written


def _accuracy_axis(axis: Any, rows: Sequence[Mapping[str, Any]], x_key: str, plt: Any) -> None:
    by_method: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        by_method[row["method"]].append(row)
    methods = [m for m in by_method if m != "unpruned"]  # the grid's order
    palette = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    for index, method in enumerate(methods):
        points = _points(by_method[method], x_key)
        if points:
            axis.plot(
                *zip(*points), marker=MARKERS[index % len(MARKERS)], markersize=5, color=palette(index % palette.N),
                linestyle=_LINES[index % len(_LINES)], alpha=0.85, label=method,
            )
    reference = _points(by_method.get("unpruned", []), x_key)
    if reference:
        axis.axhline(reference[0][1], color="black", linestyle="--", linewidth=1, label="unpruned")
        axis.plot(*zip(*reference), "k*", markersize=10)
    if any(_points(members, x_key) for members in by_method.values()):
        axis.set_xscale("log")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7)


def _points(members: Sequence[Mapping[str, Any]], x_key: str) -> list[tuple[float, float]]:
    return sorted(
        (float(m[x_key]), float(m["accuracy"])) for m in members
        if isinstance(m.get(x_key), (int, float)) and m[x_key] > 0 and m.get("accuracy") is not None
    )


def _overlay_montage(rows: Sequence[Mapping[str, Any]], root: Path, out: Path, limit: int, plt: Any) -> Optional[Path]:
    """One row per method of the grid at one budget (the one the most methods have overlays
    for; the smallest on a tie), the same images across a row's columns."""
    from PIL import Image

    results = ResultsDir(root)
    found: dict[Any, dict[str, dict[str, Path]]] = defaultdict(dict)  # budget -> method -> image name -> path
    for row in rows:
        if row["method"] == "unpruned":
            continue
        for key in row.get("keys", [])[:1]:
            images = {p.name: p for p in sorted(results.overlay_dir(key).glob("*.png"))}
            if images:
                found[row["budget"]][row["method"]] = images
    if not found:
        return None
    budget = max(found, key=lambda b: (len(found[b]), -_number(b)))
    methods = found[budget]
    shared = sorted(set.intersection(*(set(images) for images in methods.values()))) or sorted(next(iter(methods.values())))
    names = shared[: max(1, min(4, limit))]
    picked = list(methods.items())[: max(1, limit)]
    figure, axes = plt.subplots(len(picked), len(names), figsize=(2.6 * len(names), 2.6 * len(picked)), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for line, (method, images) in enumerate(picked):
        for column, name in enumerate(names):
            if name in images:
                axes[line][column].imshow(Image.open(images[name]))
            if column == 0:
                axes[line][column].set_title(method, fontsize=7, loc="left")
    figure.suptitle(f"kept tokens at budget {budget}", fontsize=9)
    figure.tight_layout()
    target = out / "kept_tokens.png"
    figure.savefig(target, dpi=110)
    plt.close(figure)
    return target


def _number(budget: Any) -> float:
    return float(budget) if isinstance(budget, (int, float)) and not isinstance(budget, bool) else 0.0
