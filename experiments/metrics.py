"""Per-sample records and per-cell metrics: accuracy, fidelity, tokens kept, analytic cost, latency.

A per-sample row (one line of ``samples.jsonl``) is built by `sample_row`; `summarize` turns the
rows of a cell (and those of the unpruned run, for fidelity) into the cell's metrics:

- ``accuracy``: mean of the task's primary metric (``score/<name>`` for every metric);
- ``fidelity``: share of samples whose answer (what the task scores: `task_answer`, e.g. the
  organism's first word) equals the unpruned model's; ``fidelity_text``: the same on the whole
  generated strings (after `normalize_answer`), a stricter second view;
- ``tokens_visual`` / ``tokens_requested`` / ``tokens_kept`` (means per sample, all images),
  ``kept_ratio``, ``tokens_kept_layer/<k>`` for in-LLM drops and schedules;
- ``flops`` / ``flops_ratio`` and ``kv_bytes`` / ``kv_ratio``: analytic prefill FLOPs and KV-cache
  bytes (`vtprune.experiments.cost`) relative to the same samples unpruned;
- ``prefill_ms``, ``decode_ms_per_token``, ``prefill_peak_mb``, ``decode_peak_mb``: measured (means
  over generate calls).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Mapping, Optional, Sequence

from . import cost
from .samples import normalize_answer, primary_metric

__all__ = ["sample_row", "summarize", "select_groups", "fidelity", "fidelity_text", "requested_tokens"]

_GROUP_PREFIXES = {
    "accuracy": ("accuracy", "score/"),
    "fidelity": ("fidelity",),
    "tokens": ("tokens_", "kept_ratio"),
    "cost": ("flops", "kv_"),
    "latency": ("prefill_", "decode_"),
}


def requested_tokens(budget: Any, visual_tokens: Sequence[int]) -> float:
    """Tokens the budget asks for, summed over images (an int per image, or a fraction)."""
    if budget is None:
        return float(sum(visual_tokens))
    if isinstance(budget, float):
        return float(sum(budget * n for n in visual_tokens))
    return float(budget * len(visual_tokens))


def sample_row(
    sample: Any,
    question: str,
    generation: Any,
    scores: Mapping[str, float],
    accuracy_key: str,
    config: Any,
    budget: Any,
    timing: Mapping[str, Any],
    batch: int,
    answer: Optional[str] = None,
) -> dict[str, Any]:
    """The JSON record of one answered sample; ``answer`` is the normalised answer the task scores
    (`vtprune.experiments.samples.task_answer`; default: the normalised prediction). ``accuracy`` is
    None when ``scores`` lacks ``accuracy_key`` (a request answered before it is scored)."""
    shape = cost.decoder_shape(config)
    visual = int(sum(generation.visual_tokens))
    full = [generation.total_tokens] * shape.layers
    lengths = cost.layer_lengths(shape.layers, generation.total_tokens, visual, generation.kept_from_layer)
    width = cost.dtype_bytes(config)
    return {
        "id": sample.id,
        "question": question,
        "answers": list(sample.answers),
        "prediction": generation.prediction,
        "answer": answer if answer is not None else normalize_answer(generation.prediction),
        "scores": dict(scores),
        "accuracy": float(scores[accuracy_key]) if accuracy_key in scores else None,
        "visual_tokens": visual,
        "tokens_requested": requested_tokens(budget, generation.visual_tokens),
        "tokens_kept": int(sum(generation.kept)) if generation.kept is not None else visual,
        "kept_per_image": generation.kept,
        "per_layer_kept": {str(k): v for k, v in generation.per_layer_kept.items()},
        "kept_from_layer": {str(k): v for k, v in generation.kept_from_layer.items()},
        "total_tokens": generation.total_tokens,
        "flops": cost.prefill_flops(config, lengths),
        "flops_unpruned": cost.prefill_flops(config, full),
        "kv_bytes": cost.kv_cache_bytes(config, lengths, bytes_per_value=width),
        "kv_bytes_unpruned": cost.kv_cache_bytes(config, full, bytes_per_value=width),
        "batch": batch,
        **{k: v for k, v in timing.items()},
        "kept_indices": generation.kept_indices,
        "meta": dict(getattr(sample, "meta", {}) or {}),
    }


def _row_answer(row: Mapping[str, Any]) -> str:
    """A row's scored answer (rows written before the ``answer`` field: the normalised prediction)."""
    answer = row.get("answer")
    return str(answer) if answer is not None else normalize_answer(row.get("prediction", ""))


def _row_text(row: Mapping[str, Any]) -> str:
    return normalize_answer(row.get("prediction", ""))


def _agreement(rows: Iterable[Mapping[str, Any]], baseline: Iterable[Mapping[str, Any]], view: Any) -> tuple[Optional[float], int]:
    reference = {str(r["id"]): view(r) for r in baseline}
    same = [view(r) == reference[str(r["id"])] for r in rows if str(r["id"]) in reference]
    return (sum(same) / len(same) if same else None), len(same)


def fidelity(rows: Iterable[Mapping[str, Any]], baseline: Iterable[Mapping[str, Any]]) -> tuple[Optional[float], int]:
    """(share of samples whose scored answer equals the unpruned model's, samples compared)."""
    return _agreement(rows, baseline, _row_answer)


def fidelity_text(rows: Iterable[Mapping[str, Any]], baseline: Iterable[Mapping[str, Any]]) -> tuple[Optional[float], int]:
    """(share of samples whose whole normalised generated text equals the unpruned model's, samples compared)."""
    return _agreement(rows, baseline, _row_text)


def _mean(values: Iterable[Any]) -> Optional[float]:
    items = [float(v) for v in values if v is not None]
    return sum(items) / len(items) if items else None


def summarize(rows: Sequence[Mapping[str, Any]], baseline: Optional[Sequence[Mapping[str, Any]]] = None) -> dict[str, Any]:
    """The metrics of one cell from its per-sample rows."""
    if not rows:
        return {"n_samples": 0}
    out: dict[str, Any] = {"n_samples": len(rows), "accuracy": _mean(r.get("accuracy") for r in rows)}
    names = list(dict.fromkeys(k for r in rows for k in (r.get("scores") or {})))
    for name in names:
        out[f"score/{name}"] = _mean((r.get("scores") or {}).get(name) for r in rows)
    if baseline is not None:
        out["fidelity"], out["fidelity_n"] = fidelity(rows, baseline)
        out["fidelity_text"] = fidelity_text(rows, baseline)[0]
    for key in ("visual_tokens", "tokens_requested", "tokens_kept"):
        out[key if key != "visual_tokens" else "tokens_visual"] = _mean(r.get(key) for r in rows)
    if out.get("tokens_visual"):
        out["kept_ratio"] = out["tokens_kept"] / out["tokens_visual"]
    layers: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        for layer, value in (row.get("kept_from_layer") or {}).items():
            layers[layer].append(value)
    for layer in sorted(layers, key=int):
        out[f"tokens_kept_layer/{layer}"] = _mean(layers[layer])
    for key in ("flops", "flops_unpruned", "kv_bytes", "kv_bytes_unpruned"):
        out[key] = _mean(r.get(key) for r in rows)
    if out.get("flops_unpruned"):
        out["flops_ratio"] = out["flops"] / out["flops_unpruned"]
    if out.get("kv_bytes_unpruned"):
        out["kv_ratio"] = out["kv_bytes"] / out["kv_bytes_unpruned"]
    batches: dict[Any, Mapping[str, Any]] = {}
    for row in rows:
        batches.setdefault(row.get("batch"), row)
    per_batch = list(batches.values())
    prefill = _mean(b.get("prefill_s") for b in per_batch)
    out["prefill_ms"] = prefill * 1000 if prefill is not None else None
    steps = sum(int(b.get("decode_steps") or 0) for b in per_batch)
    decode = sum(float(b.get("decode_s") or 0.0) for b in per_batch)
    out["decode_ms_per_token"] = decode / steps * 1000 if steps else None
    for key in ("prefill_peak_bytes", "decode_peak_bytes"):
        value = _mean(b.get(key) for b in per_batch)
        out[key.replace("_bytes", "_mb")] = value / 2**20 if value is not None else None
    return out


def accuracy_key(task: Any, scores: Mapping[str, float]) -> str:
    return primary_metric(task, scores)


def select_groups(metrics: Mapping[str, Any], groups: Sequence[str]) -> dict[str, Any]:
    """``metrics`` restricted to the requested metric groups (``n_samples`` always kept)."""
    prefixes = tuple(p for g in groups for p in _GROUP_PREFIXES.get(g, ()))
    return {k: v for k, v in metrics.items() if k == "n_samples" or k.startswith(prefixes)}
