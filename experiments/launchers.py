"""Grid launchers: ``local`` (in this process) and ``slurm`` (submitit).

A launcher factory takes the grid's ``launcher.options`` and returns an object with
``launch(cells, run_cell)``. Cells are independent and resumable (a finished cell is skipped on
the next ``vtprune run``), so a launcher may return before its jobs finish.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

__all__ = ["LocalLauncher", "SlurmLauncher"]


class LocalLauncher:
    """Runs the cells one after the other in this process, with a progress bar over the grid, or,
    without progress bars (``--no-progress``, or output that is not a terminal), one line per cell.
    Baselines come first, so every pruned cell can compute its fidelity."""

    def __init__(self) -> None:
        pass

    def launch(self, cells: Sequence[Any], run_cell: Callable[[Any], Any], progress: bool = True) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(cells, desc="grid", unit="cell", disable=not progress)
        failed = 0
        for number, cell in enumerate(bar, start=1):
            bar.set_postfix_str(f"{failed} failed" if failed else "", refresh=False)
            started = time.perf_counter()
            record = run_cell(cell)
            status = record.get("status", "?") if isinstance(record, dict) else "?"
            if status == "failed":
                failed += 1
                bar.write(f"cell {cell.key} ({cell.describe()}) failed: {record.get('error')}")
            elif not progress:
                print(f"[{number}/{len(cells)}] {status} {cell.key} {cell.describe()} ({time.perf_counter() - started:.1f}s)", flush=True)
        bar.close()


class SlurmLauncher:
    """Submits cells with submitit: a job array (``array: true``, default) or one job per cell.

    Options: ``folder`` (submitit logs; default ``<results>/slurm``), ``cluster`` (None = Slurm when
    available; "local" runs the jobs as local processes, "debug" in this process), ``wait`` (default
    true: block until the jobs end), ``array``, and any submitit parameter (``timeout_min``,
    ``slurm_partition``, ``gpus_per_node``, ``cpus_per_task``, ``mem_gb``, ``slurm_array_parallelism``,
    ``slurm_additional_parameters``, ...). The unpruned baselines are submitted and waited for first
    so that every pruned cell finds them. Rerunning ``vtprune run`` resubmits only unfinished cells.
    """

    def __init__(self, folder: Optional[str] = None, cluster: Optional[str] = None, wait: bool = True, array: bool = True, **parameters: Any) -> None:
        self.folder, self.cluster, self.wait, self.array = folder, cluster, wait, array
        self.parameters = {"timeout_min": 240, **parameters}
        self.jobs: list[Any] = []

    def _executor(self, root: Path) -> Any:
        try:
            import submitit
        except ImportError as error:
            raise RuntimeError("the slurm launcher needs submitit: pip install 'vtprune[slurm]'") from error
        folder = Path(self.folder) if self.folder else root / "slurm"
        executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=self.cluster)
        executor.update_parameters(name="vtprune", **self.parameters)
        return executor

    def launch(self, cells: Sequence[Any], run_cell: Callable[[Any], Any], progress: bool = True) -> None:
        root = Path(getattr(run_cell, "root", "."))
        executor = self._executor(root)
        baselines = [c for c in cells if c.is_baseline]
        others = [c for c in cells if not c.is_baseline]
        for group in (baselines, others):
            if not group:
                continue
            jobs = self._submit(executor, run_cell, group)
            self.jobs.extend(jobs)
            print(f"submitted {len(jobs)} job(s): {', '.join(str(j.job_id) for j in jobs[:5])}{' ...' if len(jobs) > 5 else ''}")
            if self.wait or (group is baselines and others):
                for job in jobs:
                    job.result()

    def _submit(self, executor: Any, run_cell: Callable[[Any], Any], cells: Sequence[Any]) -> list[Any]:
        if self.array and len(cells) > 1:
            return list(executor.map_array(run_cell, list(cells)))
        return [executor.submit(run_cell, cell) for cell in cells]
