"""A probe for issue 18: one *large* target among one-token distractors (measured, not a shipped task).

Usage::

    python -m vtprune.experiments.organism.large_target --split validation --n 200 --style filled outline

Contract
--------
* ``render_large_target_scene(rng, style)``: a ``clutter``-like scene whose object 0 is a large
  shape (box side ``TARGET_SIDE`` = 3-4 patches, drawn ``"filled"`` or as an ``"outline"`` like the
  shapes task) whose colour no other object has, plus distractors up to ``CLUTTER_OBJECTS`` objects
  in all: small filled one-token shapes (as ``clutter.py``) of the other colours, on grid cells
  that do not touch the target's bounding box. So the target covers several visual tokens
  (6-24), each distractor exactly one.
* One question per scene, ``shape`` "what shape is the <c> one ?" (the colour is unique; the
  existing vocabulary): the answer needs the target, and was meant to need *several* of its tokens
  (a single token of a large filled shape was expected to be ambiguous).
* Deterministic: scene ``i`` of split ``s`` comes from
  ``default_rng([SPLIT_SEEDS[s] + i, LARGE_TARGET_STREAM])``, a stream distinct from the shapes
  and clutter tasks'.
* ``split_curves(model, processor, samples, budget)``: for one budget, the split oracle's accuracy
  at every critical count, the fixed ratios / ``dynamic`` / ``auto`` read from it
  (``split_table.split_rows``), diversity only (``relevance.none+fps``), the share of the
  ``budget`` most relevant tokens that lie on the target, and per row whether the most relevant
  token is *interior* to the target (``interior_tokens``: its four grid neighbours are target
  tokens too, so its own 8x8 pixels are one uniform colour when the target is filled).
* ``main`` prints these curves for each style (docs/demo.md, "What would make relevance win").
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import numpy as np

from .clutter import CLUTTER_OBJECTS
from .clutter import _COLOR_JITTER, _GRID, _PIXEL_NOISE
from .clutter import _SIDE_RANGE as _DISTRACTOR_SIDE
from .task import (
    _STROKE_RANGE,
    BG_LEVEL,
    BG_NOISE,
    COLORS,
    IMAGE_SIZE,
    PATCH,
    SHAPES,
    SPLIT_SEEDS,
    _outline_mask,
    _shape_mask,
    patch_labels,
    Sample,
    Scene,
    SceneObject,
    stream_rng,
)

__all__ = [
    "LARGE_TARGET_STREAM",
    "STYLES",
    "TARGET_SIDE",
    "large_target_rng",
    "interior_tokens",
    "large_target_sample",
    "main",
    "make_large_target_split",
    "render_large_target_scene",
    "split_curves",
]

STYLES: tuple[str, ...] = ("filled", "outline")
TARGET_SIDE: tuple[float, float] = (3.0 * PATCH, 4.0 * PATCH)  # box side of the target: 3-4 patches
LARGE_TARGET_STREAM = 2  # second seed entry (shapes: none, clutter: 1)
_GAP = 1.0  # px between the target's box and a distractor's cell


def large_target_rng(split: str, index: int) -> np.random.Generator:
    """The generator owning large-target scene ``index`` of ``split``."""
    return stream_rng(split, index, LARGE_TARGET_STREAM)


def _free_cells(cy: float, cx: float, side: float) -> list[int]:
    """Grid cells (row-major) whose 8x8 box stays ``_GAP`` px clear of the target's bounding box."""
    lo_y, hi_y = cy - side / 2 - _GAP, cy + side / 2 + _GAP
    lo_x, hi_x = cx - side / 2 - _GAP, cx + side / 2 + _GAP
    free = []
    for cell in range(_GRID * _GRID):
        y0, x0 = (cell // _GRID) * PATCH, (cell % _GRID) * PATCH
        if y0 >= hi_y or y0 + PATCH <= lo_y or x0 >= hi_x or x0 + PATCH <= lo_x:
            free.append(cell)
    return free


def render_large_target_scene(rng: np.random.Generator, style: str) -> Scene:
    """A scene whose object 0 is a large target of unique colour, drawn in ``style`` (module doc)."""
    if style not in STYLES:
        raise ValueError(f"unknown large-target style {style!r}; expected one of {list(STYLES)}")
    n = int(rng.integers(CLUTTER_OBJECTS[0], CLUTTER_OBJECTS[1] + 1))
    color, shape = str(rng.choice(list(COLORS))), str(rng.choice(list(SHAPES)))
    side = float(rng.uniform(*TARGET_SIDE))
    stroke = float(rng.uniform(*_STROKE_RANGE))
    lo, hi = side / 2 + 1, IMAGE_SIZE - side / 2 - 1
    cy, cx = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5  # (H, W) each
    object_map = np.full((IMAGE_SIZE, IMAGE_SIZE), -1, dtype=np.int64)  # (H, W)
    filled = style == "filled"
    object_map[_shape_mask(shape, cy, cx, side, yy, xx) if filled else _outline_mask(shape, cy, cx, side, stroke, yy, xx)] = 0
    objects = [SceneObject(color, shape, cy, cx, side, side / 2 if filled else stroke)]
    others = [c for c in COLORS if c != color]
    for k, cell in enumerate(rng.permutation(_free_cells(cy, cx, side))[: n - 1], start=1):
        c, s = others[int(rng.integers(len(others)))], SHAPES[int(rng.integers(len(SHAPES)))]
        d = float(rng.uniform(*_DISTRACTOR_SIDE))
        slack = (PATCH - d) / 2.0  # the shape stays inside its cell
        y = (cell // _GRID) * PATCH + PATCH / 2.0 + float(rng.uniform(-slack, slack))
        x = (cell % _GRID) * PATCH + PATCH / 2.0 + float(rng.uniform(-slack, slack))
        object_map[_shape_mask(s, y, x, d, yy, xx)] = k
        objects.append(SceneObject(c, s, y, x, d, stroke=d / 2.0))
    image = np.clip(BG_LEVEL + rng.normal(0.0, BG_NOISE, size=(IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255)  # (H, W, 3)
    for k, obj in enumerate(objects):
        where = object_map == k  # (H, W)
        rgb = np.clip(np.array(COLORS[obj.color], dtype=np.float64) + rng.normal(0.0, _COLOR_JITTER, size=3), 0, 255)
        image[where] = rgb + rng.normal(0.0, _PIXEL_NOISE, size=(int(where.sum()), 3))
    image = np.clip(image, 0, 255).astype(np.uint8)  # (H, W, 3)
    return Scene(image=image, objects=objects, object_map=object_map, patch_labels=patch_labels(object_map))


def large_target_sample(split: str, index: int, style: str = "filled") -> Sample:
    """Scene ``index`` of ``split`` with its question "what shape is the <c> one ?"."""
    scene = render_large_target_scene(large_target_rng(split, index), style)
    target = scene.objects[0]
    question = f"what shape is the {target.color} one ?"
    return Sample(scene.image, question, target.shape, "shape", scene.patch_labels, [0], scene.objects)


def make_large_target_split(split: str, n_samples: int, style: str = "filled", start: int = 0) -> list[Sample]:
    """Samples ``start .. start + n_samples - 1`` of ``split`` in ``style``."""
    return [large_target_sample(split, k, style) for k in range(start, start + n_samples)]


def interior_tokens(labels: np.ndarray, target: int = 0) -> np.ndarray:
    """(N,) bool: tokens of ``target`` whose four grid neighbours (all inside the grid) are ``target`` too."""
    grid = (labels == target).reshape(_GRID, _GRID)  # (G, G)
    padded = np.pad(grid, 1, constant_values=False)  # (G + 2, G + 2)
    inner = grid & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]  # (G, G)
    return inner.reshape(-1)


def split_curves(model: Any, processor: Any, samples: Sequence[Sample], budget: int) -> dict[str, Any]:
    """One budget's curves (module doc).

    Keys: ``per_critical`` (budget + 1,) accuracy, ``rows`` {name: accuracy}, ``auto_counts``
    (budget + 1,), ``top_on_target`` float, ``correct`` (S, budget + 1) bool, ``top1_interior`` (S,) bool.
    """
    from vtprune.strategies.budget import AutoSplit

    from .split_oracle import chosen_critical_counts, split_outcomes
    from .split_table import split_rows

    res = split_outcomes(model, processor, samples, budget)
    _, diversity = chosen_critical_counts(model, processor, samples, budget, recipe="relevance.none+fps")
    rows, chosen = split_rows(res.correct, res.scores, budget, AutoSplit())
    top = np.argsort(-res.scores, axis=1, kind="stable")[:, :budget]  # (S, budget)
    on_target = np.array([np.isin(s.patch_labels[t], s.target_objects).mean() for s, t in zip(samples, top)])
    interior = np.array([interior_tokens(s.patch_labels)[t[0]] for s, t in zip(samples, top)])  # (S,)
    return {
        "correct": res.correct,
        "top1_interior": interior,
        "per_critical": res.correct.mean(axis=0),
        "rows": {**{k: v[0] for k, v in rows.items()}, "diversity only": float(diversity.mean())},
        "auto_counts": np.bincount(chosen, minlength=budget + 1),
        "top_on_target": float(on_target.mean()),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (module doc)."""
    import torch

    from . import WEIGHTS_DIR, load_organism
    from .evaluate import answer

    ap = argparse.ArgumentParser(prog="python -m vtprune.experiments.organism.large_target")
    ap.add_argument("--split", default="validation", choices=("validation", "test"))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--style", nargs="+", default=list(STYLES), choices=STYLES)
    ap.add_argument("--weights", default="weights_clutter", help="weights folder next to weights/")
    ap.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4, 6, 12])
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, processor = load_organism(path=WEIGHTS_DIR.parent / a.weights)
    for style in a.style:
        samples = make_large_target_split(a.split, a.n, style)
        sizes = np.array([(s.patch_labels == 0).sum() for s in samples])
        preds = answer(model, processor, samples)
        acc = float(np.mean(np.array(preds) == np.array([s.answer for s in samples])))
        print(f"## {style} ({a.split}, n={a.n}, {a.weights}): target tokens {sizes.min()}-{sizes.max()} "
              f"(mean {sizes.mean():.1f}); all 64 tokens: {acc:.3f}")
        for budget in a.budgets:
            cur = split_curves(model, processor, samples, budget)
            print(f"{budget} tokens: accuracy by critical count 0..{budget}: "
                  + " ".join(f"{v:.3f}" for v in cur["per_critical"]))
            print("  " + ", ".join(f"{k} {v:.3f}" for k, v in cur["rows"].items())
                  + f"; top-{budget} relevance on target {cur['top_on_target']:.3f}; auto counts {cur['auto_counts'].tolist()}")
            inner, ok = cur["top1_interior"], cur["correct"][:, 0]
            if budget == a.budgets[0] and inner.any():  # the most relevant token does not depend on the budget
                print(f"  most relevant token interior in {int(inner.sum())} rows: accuracy (critical 0) "
                      f"{ok[inner].mean():.3f} there, {ok[~inner].mean():.3f} elsewhere")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
