"""The built-in tasks and launchers, registered through the same hooks as third-party plugins."""

from __future__ import annotations

from vtprune.framework.hookspecs import hookimpl
from vtprune.framework.registry import Registry

from .launchers import LocalLauncher, SlurmLauncher
from .organism.vqa_task import OrganismTask
from .tasks import JsonlTask, LmmsEvalTask, SyntheticTask

__all__ = ["vtprune_register_tasks", "vtprune_register_launchers"]


@hookimpl
def vtprune_register_tasks(registry: Registry) -> None:
    registry.add_task("jsonl", JsonlTask, "your own data: JSONL lines with image path(s), question, answers (VQA / exact match)")
    registry.add_task("synthetic", SyntheticTask, "seeded random colour questions, for dry runs with model.name=dummy")
    registry.add_task("lmms_eval", LmmsEvalTask, "benchmarks through lmms-eval (GQA, POPE, TextVQA, ...); needs vtprune[eval]")
    registry.add_task("organism", OrganismTask, "the demo organism's synthetic VQA (colour/shape/exists/count; reports target_kept)")


@hookimpl
def vtprune_register_launchers(registry: Registry) -> None:
    registry.add_launcher("local", LocalLauncher, "run the cells one after the other in this process")
    registry.add_launcher("slurm", SlurmLauncher, "submit the cells with submitit (job array or one job per cell)")
