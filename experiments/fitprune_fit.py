"""Fitting a FitPrune recipe on calibration samples, and the recipe file grids read.

`fit_fitprune` runs the model (through vtprune's hooks: nothing here touches a layer) over calibration samples,
one sample per forward, as the official ``statistical_analysis.py`` does: a recording pass per sample gives the
unpruned attention totals of every layer; then for each ``alpha`` of the bisection every sample runs pruned at every
layer by the fitting rule (`functional.fitprune.fitprune_sample_deletions`), and `fitprune_scheme` turns the
per-layer deletions into the recipe and says whether the FLOPs budget is met. Deterministic: the same model and
samples give the same recipe. The recipe file is JSON::

    {"method": "fitprune", "deletions": [14, 33, ...], "tokens": 576, "budget": 562,
     "reduction": 0.6, "alpha": 0.4921875, "reached": true, "samples": 8, "probes": [[0.5, true], ...]}

and `recipe_params` gives ``framework.prune(model, "fitprune", **recipe_params(recipe))``'s arguments (a grid cell:
``method.recipe: fitprune``, ``method.params: {deletions: [...], tokens: ...}``, ``budget: <budget>``). docs/methods.md ("FitPrune") shows the calls.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from vtprune import framework
from vtprune.framework.selection import selection_from_masks
from vtprune.strategies.functional.fitprune import (
    ALPHA_TOLERANCE,
    FlopModel,
    fitprune_layer_totals,
    fitprune_sample_deletions,
    fitprune_scheme,
    fitprune_search,
)

from .cost import decoder_shape

__all__ = ["FitPruneRecipeFile", "fit_fitprune", "save_recipe", "load_recipe", "recipe_params", "run_fit_pass"]

#: Every layer's attention rows, read at drops that keep what the fitting rule leaves (stages unused but the
#: signals they declare: prompt and visual attention rows).
_SIGNALS_RECIPE = "relevance.fitprune+critical.topk_official(op=sort_drop)+diversity.none+budget.split(critical=1.0)"


@dataclass(frozen=True)
class FitPruneRecipeFile:
    """A fitted recipe: ``deletions[l]`` tokens after decoder layer l for images of ``tokens`` tokens."""

    deletions: tuple[int, ...]
    tokens: int
    reduction: float
    alpha: float
    reached: bool
    samples: int
    probes: tuple[tuple[float, bool], ...] = ()
    method: str = "fitprune"

    @property
    def budget(self) -> int:
        """The requested budget that reproduces the recipe: the tokens kept after layer 0."""
        return self.tokens - (self.deletions[0] if self.deletions else 0)


class _FitPass:
    """A duck-typed pipeline for one calibration forward (batch of one): drop i sits before layer i + 1 and sees
    layer i's attention rows; it records the layer's totals (``totals`` None) or deletes what the fitting rule
    deletes at ``alpha`` against the sample's unpruned ``totals``."""

    def __init__(self, layers: int, totals: Optional[Sequence[tuple[float, float]]], alpha: float, registry: Any):
        schedule = f"+placement.schedule(layers={list(range(1, layers))}, ratio=1.0)"
        self.pipeline = framework.compose(_SIGNALS_RECIPE + schedule, registry=registry)
        self.totals, self.alpha = totals, alpha
        self.seen_totals: list[tuple[float, float]] = []
        self.deleted: list[int] = []
        self.start = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipeline, name)

    def select(self, signals: framework.Signals, budget: Any):
        if signals.batch_size != 1:
            raise ValueError(f"fitting runs one calibration sample per forward, got a batch of {signals.batch_size}")
        layer = len(self.deleted)
        n = int(signals.valid()[0].sum())
        self.start = self.start or n
        prompt = signals.prompt_attention[0]  # (H, T, N)
        if signals.prompt_mask is not None:
            prompt = prompt[:, signals.prompt_mask[0]]  # (H, T_b, N)
        prompt_rows, visual_rows = prompt[:, :, :n], signals.visual_attention[0, :, :n, :n]  # (H, T, n), (H, n, n)
        if self.totals is None:
            self.seen_totals.append(fitprune_layer_totals(prompt_rows, visual_rows))
            delete = torch.zeros(n, dtype=torch.bool, device=prompt.device)
        else:
            delete = fitprune_sample_deletions(prompt_rows, visual_rows, self.totals[layer], self.alpha)  # (n,)
        self.deleted.append(int(delete.sum()))
        keep = torch.zeros(signals.visual.shape[:2], dtype=torch.bool, device=prompt.device)  # (1, N)
        keep[0, :n] = ~delete
        return selection_from_masks(keep, keep)


def run_fit_pass(model: Any, sample: Mapping[str, Any], layers: int, totals=None, alpha: float = 0.0, registry=None):
    """One calibration forward: ``(visual tokens, per-layer deletions (layers entries), per-layer totals)``."""
    fit = _FitPass(layers, totals, alpha, registry)
    with framework.prune(model, fit, budget=1.0, registry=registry), torch.no_grad():
        model(**sample)
    if len(fit.deleted) != layers - 1:
        raise RuntimeError(f"expected {layers - 1} drops in the calibration forward, saw {len(fit.deleted)}")
    return fit.start, [*fit.deleted, 0], fit.seen_totals


def fit_fitprune(
    model: Any,
    samples: Sequence[Mapping[str, Any]],
    reduction: float,
    *,
    tolerance: float = ALPHA_TOLERANCE,
    pick: str = "feasible",
    registry: Any = None,
) -> FitPruneRecipeFile:
    """Fit a recipe that removes ``reduction`` of the visual tokens' decoder FLOPs (the official 0.6 = "60%").

    Args:
        model: a VLM with a vtprune adapter whose layer drops give ``prompt_attention`` / ``visual_attention``.
        samples: calibration inputs, each ``model(**sample)``'s keyword arguments for ONE sample with one image.
        reduction: in [0, 1).
        tolerance, pick: the bisection (`functional.fitprune.fitprune_search`).
    Deviation: no deletions after the last layer (they would change no output; the official fit counts them).
    """
    if not 0.0 <= reduction < 1.0:
        raise ValueError(f"reduction must be in [0, 1), got {reduction}")
    if not samples:
        raise ValueError("fit_fitprune needs at least one calibration sample")
    shape = decoder_shape(model.config)
    flops = FlopModel(shape.hidden, shape.intermediate, shape.layers)
    recorded = [run_fit_pass(model, s, shape.layers, registry=registry) for s in samples]
    start = [n for n, _, _ in recorded]
    if len(set(start)) != 1:
        raise ValueError(f"calibration images must have the same token count, got {sorted(set(start))}")

    def evaluate(alpha: float) -> tuple[bool, list[int]]:
        runs = [run_fit_pass(model, s, shape.layers, totals, alpha, registry)[1] for s, (_, _, totals) in zip(samples, recorded)]
        return fitprune_scheme(runs, start, flops, reduction)

    result = fitprune_search(evaluate, tolerance, pick)
    return FitPruneRecipeFile(result.scheme, start[0], reduction, result.alpha, result.reached, len(samples), result.probes)


def save_recipe(recipe: FitPruneRecipeFile, path: str | Path) -> Path:
    """Write ``recipe`` as JSON (with its ``budget``); returns the path."""
    path = Path(path)
    data = {**asdict(recipe), "budget": recipe.budget}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def load_recipe(path: str | Path) -> FitPruneRecipeFile:
    """Read a recipe file written by `save_recipe` (a clear error for another file)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("method") != "fitprune":
        raise ValueError(f"{path} is not a FitPrune recipe file (expected a JSON object with method: fitprune)")
    missing = sorted({"deletions", "tokens", "reduction", "alpha", "reached", "samples"} - set(data))
    if missing:
        raise ValueError(f"{path}: missing {missing}")
    return FitPruneRecipeFile(
        tuple(int(d) for d in data["deletions"]), int(data["tokens"]), float(data["reduction"]),
        float(data["alpha"]), bool(data["reached"]), int(data["samples"]),
        tuple((float(a), bool(r)) for a, r in data.get("probes", ())),
    )


def recipe_params(recipe: FitPruneRecipeFile) -> dict[str, Any]:
    """``framework.prune(model, "fitprune", **recipe_params(recipe))``: the budget and placement parameters."""
    return {"budget": recipe.budget, "deletions": tuple(recipe.deletions), "tokens": recipe.tokens}
