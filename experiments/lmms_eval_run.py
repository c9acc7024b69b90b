"""A grid cell whose task is ``lmms_eval``: lmms-eval's evaluator on the cell's loaded and pruned
model, and per-sample rows like every other task's.

`evaluate_cell` builds the vtprune lmms-eval model around the cell's backend and prune handle
(`vtprune.experiments.lmms_eval_model`), runs ``lmms_eval.evaluator.simple_evaluate`` with
``log_samples`` on (local task folders through ``include_path``), then writes one row per answered
request to the cell's ``samples.jsonl`` (`answered_row`: the same fields as an organism cell's rows,
scored with lmms-eval's per-sample metrics) and summarises them with
`vtprune.experiments.metrics.summarize`, so the cell reports the same columns (fidelity against the
unpruned cell, tokens, FLOPs, KV bytes, latency) plus lmms-eval's aggregates ``<task>/<metric>``.
``accuracy`` is the aggregate named by the task's ``metric`` option (default: the first one).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from .lmms_eval_model import _require_lmms_eval, answered_row, build_model_class, flatten_results
from .metrics import select_groups, summarize

__all__ = ["evaluate_cell", "evaluate_with_lmms_eval", "sample_scores", "chat_template_problem"]


def sample_scores(output: Mapping[str, Any]) -> dict[tuple[str, str], tuple[dict[str, float], Optional[str], list[str]]]:
    """Per logged sample of ``simple_evaluate(..., log_samples=True)``: ``(task, doc_id)`` -> (its
    numeric per-sample metrics, the filtered response lmms-eval scored, the target as a list)."""
    skip = {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "token_counts", "doc_hash", "input_media"}
    out = {}
    for task, logged in (output.get("samples") or {}).items():
        for entry in logged or []:
            scores = {
                k: float(v) for k, v in entry.items()
                if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            responses = entry.get("filtered_resps") or []
            first = responses[0] if responses else None
            while isinstance(first, (list, tuple)) and first:
                first = first[0]
            target = entry.get("target")
            targets = [str(t) for t in target] if isinstance(target, (list, tuple)) else ([] if target is None else [str(target)])
            out[(str(task), str(entry.get("doc_id")))] = (scores, None if first is None else str(first), targets)
    return out


def chat_template_problem() -> Optional[str]:
    """Why lmms-eval's ``apply_chat_template`` cannot run here, or None. lmms-eval 0.7.3's
    ``ConfigurableTask.fewshot_context`` calls ``self.append_target_question``, which that class does
    not define (an AttributeError inside lmms-eval, for every task)."""
    from lmms_eval.api.task import ConfigurableTask

    if hasattr(ConfigurableTask, "append_target_question"):
        return None
    return (
        "task option apply_chat_template: this lmms-eval's tasks cannot apply a chat template "
        "(ConfigurableTask.append_target_question is missing upstream, lmms-eval <= 0.7.3); leave model.prompt_template "
        "unset instead: the vtprune model then renders every question with the processor's chat template"
    )


def evaluate_cell(task: Any, context: Any) -> dict[str, Any]:
    """Run ``task`` (an `LmmsEvalTask`) on a cell (``context``: a `CellContext`); returns its metrics."""
    from .results import append_jsonl
    from .schema import METRIC_GROUPS

    _require_lmms_eval()
    from lmms_eval import evaluator

    from vtprune.framework.errors import VtpruneError

    problem = chat_template_problem() if task.apply_chat_template else None
    if problem:
        raise VtpruneError(problem)

    cell, results = context.cell, context.results
    budget = None if context.pipeline is None else cell.config.get("budget")
    batch_size = task.batch_size if task.batch_size is not None else context.batch_size
    model = build_model_class().from_backend(
        context.backend, context.handle, context.max_new_tokens, batch_size, budget, max_frames_num=task.max_frames_num
    )
    manager = None
    if task.include_path:
        from lmms_eval.tasks import TaskManager

        manager = TaskManager(include_path=task.include_path)
    output = evaluator.simple_evaluate(
        model=model,
        tasks=list(task.tasks),
        num_fewshot=task.num_fewshot,
        limit=context.limit,
        gen_kwargs=task.gen_kwargs or None,
        log_samples=True,
        batch_size=batch_size,
        apply_chat_template=task.apply_chat_template,
        task_manager=manager,
    ) or {}
    aggregates = flatten_results(output)
    per_sample = sample_scores(output)
    samples_file = results.samples_file(cell.key)
    samples_file.parent.mkdir(parents=True, exist_ok=True)
    for answered in model.answered:
        meta = answered.sample.meta
        scores, scored, targets = per_sample.get((str(meta["task"]), str(meta["doc_id"])), ({}, None, []))
        answered.sample.answers = targets
        metric = task.metric.split("/", 1)[1] if task.metric and "/" in task.metric else None
        append_jsonl(samples_file, answered_row(answered, context.backend.config, budget, scores, scored, metric))
    rows = results.samples(cell.key)
    baseline = results.samples(cell.baseline_key) if cell.baseline_key else None
    metrics = select_groups(summarize(rows, baseline or None), cell.config.get("metrics") or METRIC_GROUPS)
    metrics.update(aggregates)
    if aggregates:
        metrics["accuracy"] = aggregates[task.metric if task.metric in aggregates else next(iter(aggregates))]
    return metrics


#: the name `vtprune.experiments.tasks.LmmsEvalTask` calls
evaluate_with_lmms_eval = evaluate_cell
