"""Weights & Biases tracking: one wandb run per cell, grouped by grid.

``tracking.mode``: "offline" (default: written under ``<dir>/wandb``, nothing touches the network;
``wandb sync DIR`` uploads later), "online", or "disabled" (wandb is never imported). A
``WANDB_MODE`` environment variable overrides "offline"/"online"; ``WANDB_DIR``, ``WANDB_PROJECT``
and ``WANDB_ENTITY`` apply where the config leaves ``dir`` / ``entity`` unset (``project`` defaults
to ``WANDB_PROJECT``, then "vtprune").

Logged per cell: the resolved config (plus cell key, grid, canonical recipe and versions), the
metrics (history and summary), a table of per-sample results and the kept-token overlays.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

__all__ = ["Tracker", "NullTracker", "WandbTracker", "make_tracker", "versions", "run_id"]

_TABLE_COLUMNS = ("id", "question", "answers", "prediction", "accuracy", "tokens_kept", "visual_tokens", "flops")


def versions() -> dict[str, str]:
    """Versions of vtprune and the libraries that shape results."""
    import importlib.metadata

    out = {}
    for name in ("vtprune", "torch", "transformers", "lmms_eval"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


class Tracker:
    """Interface: ``log_metrics``, ``log_samples``, ``log_images``, ``finish``."""

    def log_metrics(self, metrics: Mapping[str, Any]) -> None: ...

    def log_samples(self, rows: Sequence[Mapping[str, Any]]) -> None: ...

    def log_images(self, paths: Sequence[Path]) -> None: ...

    def finish(self, failed: bool = False) -> None: ...


class NullTracker(Tracker):
    """Tracking disabled."""


class WandbTracker(Tracker):
    """One wandb run."""

    def __init__(self, run: Any, wandb: Any) -> None:
        self.run, self.wandb = run, wandb

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.run.log(clean)
        self.run.summary.update(clean)

    def log_samples(self, rows: Sequence[Mapping[str, Any]]) -> None:
        data = [[_cell(row.get(c)) for c in _TABLE_COLUMNS] for row in rows]
        self.run.log({"samples": self.wandb.Table(columns=list(_TABLE_COLUMNS), data=data)})

    def log_images(self, paths: Sequence[Path]) -> None:
        if paths:
            self.run.log({"kept_tokens": [self.wandb.Image(str(p), caption=Path(p).stem) for p in paths]})

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _cell(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return str(value)
    return value


def run_id(cell: Any) -> str:
    """The wandb run id of a cell: its key, so an interrupted or retried cell resumes its own run
    (``resume="allow"``) instead of opening another one."""
    return f"vtprune-{cell.key}"


def make_tracker(tracking: Mapping[str, Any], cell: Any, root: Path, extra: Optional[Mapping[str, Any]] = None) -> Tracker:
    """A tracker for one cell (`NullTracker` when ``tracking.mode`` is "disabled")."""
    mode = tracking.get("mode", "offline")
    if mode == "disabled":
        return NullTracker()
    try:
        import wandb
    except ImportError as error:  # pragma: no cover - wandb is a dependency
        raise RuntimeError("tracking needs wandb: pip install wandb, or set tracking.mode=disabled") from error
    mode = os.environ.get("WANDB_MODE", mode)
    directory = tracking.get("dir") or os.environ.get("WANDB_DIR") or str(root)
    Path(directory).mkdir(parents=True, exist_ok=True)
    config = {**cell.config, "cell_key": cell.key, "grid": cell.grid, "assignment": cell.assignment, **(extra or {})}
    config["versions"] = versions()
    name = f"{cell.label} | {cell.describe()}"[:120]
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT") or tracking.get("project") or "vtprune",
        entity=tracking.get("entity") or None,
        group=cell.grid or None,
        job_type="baseline" if cell.is_baseline else "cell",
        name=name,
        id=run_id(cell),
        resume="allow",
        tags=list(tracking.get("tags") or []),
        config=config,
        dir=directory,
        mode=mode,
        reinit="create_new",
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
    )
    return WandbTracker(run, wandb)
