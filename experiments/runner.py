"""Running cells and grids: resumable, failure-tolerant, observed.

`run_grid` writes the resolved grid, skips cells whose latest state in ``cells.jsonl`` is "done"
(and "failed" ones unless ``retry_failed``), and hands the rest to the grid's launcher with
`CellRunner` (a picklable callable, so cluster launchers can ship it). `run_cell` runs one cell:
it loads the task and model (re-used across consecutive cells of the same model), composes the
pipeline, answers every sample not already in the cell's ``samples.jsonl`` (a crashed cell
resumes where it stopped), appends one line per sample, and records the cell's metrics, or its
traceback when anything raises, as one line of ``cells.jsonl``.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from .cells import Cell
from .config import GridSpec
from .locks import cell_lock
from .pipelines import PipelineCache, build_pipeline, recipe_versions
from .results import ResultsDir, append_jsonl

__all__ = ["CellRunner", "CellContext", "run_cell", "run_grid", "GridSummary", "ModelCache", "stale_cells"]


class ModelCache:
    """The last loaded backend, re-used while consecutive cells name the same weights (model name,
    dtype, device, ... : `vtprune.experiments.models.LOAD_KEYS`); prompt settings are per cell.
    Weights load quietly (no transformers progress bar) unless ``progress``."""

    def __init__(self, progress: bool = True) -> None:
        self.key: Optional[str] = None
        self.backend: Any = None
        self.loads = 0
        self.progress = progress

    def get(self, model: Mapping[str, Any], registry: Any) -> Any:
        from .models import load_backend, load_key

        key = load_key(model)
        if key != self.key:
            self.backend = None
            with _loading_bars(self.progress):
                self.backend = load_backend(model, registry)
            self.key = key
            self.loads += 1
        return self.backend.for_model(model)


@contextlib.contextmanager
def _loading_bars(show: bool) -> Iterator[None]:
    """transformers' weight-loading progress bar on or off for the duration (restored after)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if show else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


@dataclass
class CellContext:
    """What a task's ``evaluate(context)`` gets: the cell, its backend, pipeline and prune handle,
    the results directory, the sample limit and generation settings."""

    cell: Cell
    results: ResultsDir
    backend: Any
    pipeline: Any
    handle: Any
    limit: Optional[int]
    max_new_tokens: int
    batch_size: int


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _batches(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_cell(
    cell: Cell,
    root: Path | str,
    registry: Any = None,
    cache: Optional[ModelCache] = None,
    progress: bool = True,
    pipelines: Optional[PipelineCache] = None,
) -> dict[str, Any]:
    """Run one cell and append its state ("done" with metrics, or "failed" with the traceback) to
    ``cells.jsonl``; returns that record. Only exceptions are recorded: KeyboardInterrupt and
    SystemExit stop the grid (the cell then resumes on the next run). A cell whose lock another
    process holds (`vtprune.experiments.locks`) is left to it: nothing is written and the returned
    record's status is "busy"; one that another run finished meanwhile is not run again. The pipeline comes from
    ``pipelines`` when that cache belongs to the same registry (the grid's, composed while
    validating), else it is composed here."""
    from vtprune.framework.registry import default_registry

    registry = default_registry(registry)
    results = ResultsDir(root)
    base = {"key": cell.key, "grid": cell.grid, "label": cell.label, "assignment": cell.assignment, "baseline_key": cell.baseline_key}
    with cell_lock(results.cell_dir(cell.key)) as mine:
        if not mine:  # another run (process, Slurm task) holds this cell
            return {**base, "status": "busy"}
        return _run_locked(cell, results, registry, cache or ModelCache(progress), progress, pipelines, base)


def _run_locked(
    cell: Cell, results: ResultsDir, registry: Any, cache: ModelCache, progress: bool,
    pipelines: Optional[PipelineCache], base: dict[str, Any],
) -> dict[str, Any]:
    """`run_cell` once this process holds the cell's lock."""
    started = time.time()
    _write_config(results, cell)
    tracker = None
    try:
        from .tracking import make_tracker

        pipeline = None
        extra: dict[str, Any] = {}
        if not cell.is_baseline:
            shared = pipelines is not None and pipelines.registry is registry
            pipeline = pipelines.get(cell.config) if shared else build_pipeline(cell.config, registry)
            extra = {"recipe": str(pipeline), "recipe_dict": pipeline.to_dict()}
        extra["versions"] = recipe_versions(pipeline)
        latest = results.states().get(cell.key) or {}
        if latest.get("status") == "done" and latest.get("versions") == extra["versions"]:
            return latest  # another run finished it since this run planned it
        tracker = make_tracker(cell.config.get("tracking") or {}, cell, results.root, extra)
        metrics = _execute(cell, results, registry, cache, pipeline, progress, tracker)
        record = {**base, "status": "done", "metrics": metrics, "config": cell.config, **extra, "seconds": time.time() - started}
        notes = _notes(cell, metrics)
        if notes:
            record["notes"] = notes
        tracker.log_metrics(metrics)
        tracker.finish()
    except Exception as error:  # noqa: BLE001 - a failing cell is recorded and the grid goes on
        record = {
            **base,
            "status": "failed",
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(),
            "config": cell.config,
            "seconds": time.time() - started,
        }
        if tracker is not None:
            try:
                tracker.finish(failed=True)
            except Exception:  # noqa: BLE001
                pass
    results.record(record)
    return record


def _notes(cell: Cell, metrics: Mapping[str, Any]) -> list[str]:
    """What a finished cell's user should know: a ``task.limit`` above the task's sample count."""
    limit, count = cell.config["task"].get("limit"), metrics.get("n_samples")
    if limit is not None and isinstance(count, int) and count < limit:
        return [f"task.limit is {limit} but task {cell.config['task']['name']!r} has {count} samples: ran {count}"]
    return []


def _write_config(results: ResultsDir, cell: Cell) -> None:
    import yaml

    folder = results.cell_dir(cell.key)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "config.yaml"
    if not target.exists():
        temporary = folder / f".config.{os.getpid()}.yaml"
        temporary.write_text(yaml.safe_dump({"key": cell.key, "assignment": cell.assignment, **cell.config}, sort_keys=False))
        os.replace(temporary, target)


def _execute(cell: Cell, results: ResultsDir, registry: Any, cache: ModelCache, pipeline: Any, progress: bool, tracker: Any) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from .measure import PhaseMeter
    from .metrics import accuracy_key, sample_row, select_groups, summarize
    from .samples import task_answer
    from .schema import METRIC_GROUPS

    run = cell.config
    _seed_everything(int(run.get("seed", 0)))
    task = registry.task(run["task"]["name"])(**(run["task"].get("options") or {}))
    backend = cache.get(run["model"], registry)
    generation = run.get("generation") or {}
    max_new = int(getattr(task, "max_new_tokens", None) or generation.get("max_new_tokens", 16))
    batch_size = int(generation.get("batch_size", 1))
    limit = run["task"].get("limit")
    budget = None if cell.is_baseline else run["budget"]
    positions = run.get("positions", "keep")
    with backend.prune(pipeline, budget, positions) as handle:
        if hasattr(task, "evaluate"):
            context = CellContext(cell, results, backend, pipeline, handle, limit, max_new, batch_size)
            return dict(task.evaluate(context))
        done = {str(row["id"]) for row in results.samples(cell.key)}
        samples_file = results.samples_file(cell.key)
        run_id = uuid.uuid4().hex[:8]
        overlays_left = int((run.get("tracking") or {}).get("log_images", 4))
        overlays: list[Path] = sorted(results.overlay_dir(cell.key).glob("*.png"))
        overlays_left -= len(overlays)
        bar = tqdm(total=limit, desc=f"  {cell.describe()}"[:60], leave=False, disable=not progress, unit="sample", initial=len(done))
        key = None
        with PhaseMeter(backend.module) as meter:
            pending = (s for s in task.samples(limit) if str(s.id) not in done)
            for number, batch in enumerate(_batches(pending, batch_size)):
                questions = [task.prompt(s) if hasattr(task, "prompt") else s.question for s in batch]
                meter.begin()
                outputs = backend.generate(batch, questions, handle, max_new)
                timing = meter.end()
                for sample, question, output in zip(batch, questions, outputs):
                    scores = task.score(sample, output.prediction)
                    if hasattr(task, "selection_scores") and output.kept_indices:
                        scores.update(task.selection_scores(sample, output.kept_indices))
                    key = key or accuracy_key(task, scores)
                    answer = task_answer(task, sample, output.prediction)
                    row = sample_row(sample, question, output, scores, key, backend.config, budget, timing, f"{run_id}-{number}", answer)
                    append_jsonl(samples_file, row)
                    if overlays_left > 0 and output.kept_indices and sample.images:
                        path = _save_overlay(results, cell, sample, output)
                        if path is not None:
                            overlays.append(path)
                            overlays_left -= 1
                bar.update(len(batch))
        bar.close()
    rows = results.samples(cell.key)
    baseline = results.samples(cell.baseline_key) if cell.baseline_key else None
    if cell.baseline_key and not baseline:
        baseline = None
    metrics = select_groups(summarize(rows, baseline), run.get("metrics") or METRIC_GROUPS)
    tracker.log_samples(rows)
    tracker.log_images(overlays)
    return metrics


def _save_overlay(results: ResultsDir, cell: Cell, sample: Any, output: Any) -> Optional[Path]:
    from .overlay import overlay

    picture = overlay(sample.images[0], output.kept_indices[0], output.visual_tokens[0])
    if picture is None:
        return None
    folder = results.overlay_dir(cell.key)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{str(sample.id).replace('/', '_')}.png"
    picture.save(path)
    return path


class CellRunner:
    """``runner(cell) -> record``: `run_cell` bound to a results directory (picklable; the model
    cache, the grid's composed pipelines and a non-default registry stay in the process that made it)."""

    def __init__(
        self, root: Path | str, registry: Any = None, progress: bool = True, pipelines: Optional[PipelineCache] = None
    ) -> None:
        self.root = str(root)
        self.registry = registry
        self.progress = progress
        self.pipelines = pipelines
        self.cache = ModelCache(progress)

    def __call__(self, cell: Cell) -> dict[str, Any]:
        return run_cell(cell, self.root, self.registry, self.cache, self.progress, self.pipelines)

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "registry": None, "progress": False}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)


@dataclass
class GridSummary:
    """Outcome of `run_grid`: cell keys by final status."""

    done: list[str]
    failed: list[str]
    skipped: list[str]
    pending: list[str]
    root: Path
    stale: dict[str, str] = field(default_factory=dict)
    """Finished cells kept although they ran with other versions: key -> ``vtprune 0.1.0 -> 0.2.0``."""

    def format(self, spec: GridSpec) -> str:
        states = ResultsDir(self.root).states()
        lines = [
            f"grid {spec.name!r}: {len(spec.cells)} cells: {len(self.done)} done, {len(self.skipped)} already done "
            f"(skipped), {len(self.failed)} failed" + (f", {len(self.pending)} still running/queued" if self.pending else ""),
            f"results: {self.root}",
        ]
        by_key = {c.key: c for c in spec.cells}
        for key in self.done:
            for note in states.get(key, {}).get("notes") or []:
                lines.append(f"  NOTE {key} {by_key[key].describe() if key in by_key else ''}: {note}")
        for key, change in self.stale.items():
            lines.append(f"  STALE {key} {by_key[key].describe() if key in by_key else ''}: ran with {change}")
        if self.stale:
            lines.append(f"  {len(self.stale)} finished cell(s) ran with other versions and were kept; rerun them with --rerun-stale")
        for key in self.failed:
            state = states.get(key, {})
            lines.append(f"  FAILED {key} {by_key[key].describe() if key in by_key else ''}: {state.get('error', '?')}")
        if self.failed:
            lines.append(f"  tracebacks: {self.root / 'cells.jsonl'}; rerun with --retry-failed")
        lines.append(f"report: vtprune report {self.root}")
        return "\n".join(lines)


def run_grid(
    spec: GridSpec,
    retry_failed: bool = False,
    registry: Any = None,
    progress: bool = True,
    runner: Optional[Callable[[Cell], Any]] = None,
    rerun_stale: bool = False,
) -> GridSummary:
    """Run every cell of ``spec`` that is not finished, with the grid's launcher.

    A finished cell whose recorded versions (vtprune and the distributions providing its stages)
    differ from the installed ones is stale: kept and listed in the summary, or run again from
    scratch with ``rerun_stale`` (its old samples are moved aside, not deleted)."""
    import yaml

    from vtprune.framework.registry import default_registry

    registry = default_registry(registry)
    results = ResultsDir(spec.output_dir)
    results.root.mkdir(parents=True, exist_ok=True)
    (results.root / "grid.yaml").write_text(yaml.safe_dump(spec.raw, sort_keys=False))
    before = results.states()
    stale = stale_cells(spec, before)
    if rerun_stale:
        for key in stale:
            results.archive_samples(key)
    skip_status = {"done"} if retry_failed else {"done", "failed"}
    todo = [
        cell for cell in spec.cells
        if before.get(cell.key, {}).get("status") not in skip_status or (rerun_stale and cell.key in stale)
    ]
    todo = _by_weights(todo)
    todo_keys = {cell.key for cell in todo}
    skipped = [cell.key for cell in spec.cells if before.get(cell.key, {}).get("status") == "done" and cell.key not in todo_keys]
    launcher_config = spec.raw.get("launcher") or {}
    launcher = registry.launcher(launcher_config.get("name", "local"))(**(launcher_config.get("options") or {}))
    runner = runner or CellRunner(results.root, registry, progress, spec.pipelines)
    if todo:
        launcher.launch(todo, runner, progress=progress) if _takes_progress(launcher) else launcher.launch(todo, runner)
    after = results.states()
    done = [c.key for c in todo if after.get(c.key, {}).get("status") == "done"]
    failed = [c.key for c in spec.cells if after.get(c.key, {}).get("status") == "failed"]
    pending = [c.key for c in todo if c.key not in after]
    return GridSummary(done, failed, skipped, pending, results.root, {} if rerun_stale else stale)


def _by_weights(cells: list[Cell]) -> list[Cell]:
    """``cells`` grouped by the weights they load (first appearance order; stable within a group,
    so baselines stay first), so that each model loads once per run."""
    from .models import load_key

    keys = [load_key(cell.config["model"]) for cell in cells]
    order: dict[str, int] = {}
    for key in keys:
        order.setdefault(key, len(order))
    ranked = sorted(zip(keys, range(len(cells))), key=lambda pair: order[pair[0]])  # stable: grid order within a model
    return [cells[index] for _, index in ranked]


def stale_cells(spec: GridSpec, states: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Finished cells recorded with other versions than the installed ones: key -> what changed."""
    out = {}
    for cell in spec.cells:
        state = states.get(cell.key) or {}
        recorded = state.get("versions")
        if state.get("status") != "done" or not isinstance(recorded, Mapping):
            continue
        current = recipe_versions(None if cell.is_baseline else spec.pipelines.get(cell.config))
        changes = [
            f"{name} {recorded.get(name, '?')} -> {current.get(name, '?')}"
            for name in sorted(set(recorded) | set(current)) if recorded.get(name) != current.get(name)
        ]
        if changes:
            out[cell.key] = ", ".join(changes)
    return out


def _takes_progress(launcher: Any) -> bool:
    import inspect

    try:
        return "progress" in inspect.signature(launcher.launch).parameters
    except (TypeError, ValueError):
        return False
