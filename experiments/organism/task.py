"""Synthetic visual question answering task for the model organism.

Contract
--------
* Every scene is a pure function of an integer index and the split name: the scene
  for ``(split, index)`` is drawn from ``numpy.random.default_rng(SPLIT_SEEDS[split] + index)``,
  and the seed ranges of the splits never overlap, so splits are disjoint and
  generation is deterministic.
* A scene holds 1-4 non-overlapping objects, each with a *distinct* colour (so
  "the red one" is always unique), on a noisy grey background.
* The total coloured area of a scene is drawn independently of the object count
  and then split among the objects, so coloured area does not predict the count;
  the model has to count objects.
* Per-patch labels: for each ``PATCH x PATCH`` patch (row-major, the order of the
  LLaVA visual tokens) the id of the object that covers the largest part of it,
  provided it covers at least ``MIN_PATCH_COVER`` of the patch, else ``-1``.
* Question templates (single-word answers):
  ``color``  "what color is the <shape> ?"   (asked only about a unique shape)
  ``shape``  "what shape is the <color> one ?"
  ``exists`` "is there a <color> <shape> ?"  (balanced yes/no; "no" uses a
             colour or shape that is present, so binding is required)
  ``count``  "how many shapes are there ?"   (answers one..four)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 64
PATCH = 8
N_PATCHES = (IMAGE_SIZE // PATCH) ** 2
MIN_PATCH_COVER = 0.15
# Shapes are drawn as outlines (stroke 2-4.5 px). Outlines make the shape visible inside
# every patch an object covers (filled shapes have uniform interior patches whose shape
# is only inferable from context, which a tiny vision tower learns slowly).
_STROKE_RANGE = (2.0, 4.5)
# Dark noisy background: every colour is brighter than it, so edges have the same
# luminance sign for all colours (on mid-grey, red/blue edges are nearly iso-luminant).
BG_LEVEL = 30.0
BG_NOISE = 10.0
_SIDE_RANGE = (11.0, 40.0)
# outline area ~= _RING_FACTOR[shape] * side * stroke
_RING_FACTOR = {"circle": float(np.pi), "square": 4.0, "triangle": 3.2}

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four")
TEMPLATES: tuple[str, ...] = ("color", "shape", "exists", "count")
MAX_OBJECTS = 4
BACKGROUND_WORD = "background"
OBJECT_WORD = "shapes"

# Disjoint seed ranges: each split owns [base, base + 10**7).
SPLIT_SEEDS: dict[str, int] = {"train": 0, "validation": 10_000_000, "test": 20_000_000}
SPLIT_SPAN = 10_000_000

# Total coloured area (pixels) of a scene, independent of the number of objects.
# Each object's share is then met by choosing its stroke width and side together.
_AREA_RANGE = (750.0, 1300.0)


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: colour/shape names, centre (y, x) and size in pixels."""

    color: str
    shape: str
    cy: float
    cx: float
    size: float
    stroke: float = 0.0


@dataclass
class Scene:
    """A rendered scene: the image, its objects and the per-pixel object map."""

    image: np.ndarray  # (H, W, 3) uint8
    objects: list[SceneObject]
    object_map: np.ndarray  # (H, W) int, object id or -1
    patch_labels: np.ndarray  # (N_PATCHES,) int, object id or -1


@dataclass
class Sample:
    """One VQA sample.

    ``patch_labels[i]`` is the object id covering visual token ``i`` (-1 = background);
    ``target_objects`` are the ids of the objects the question is about (all objects
    for counting, none for an "is there" question answered "no").
    """

    image: np.ndarray  # (H, W, 3) uint8
    question: str
    answer: str
    template: str
    patch_labels: np.ndarray  # (N_PATCHES,) int
    target_objects: list[int] = field(default_factory=list)
    objects: list[SceneObject] = field(default_factory=list)


def vocabulary() -> list[str]:
    """All non-special words the task (and the chat format) can produce, sorted."""
    words = {
        "USER:", "ASSISTANT:",
        "what", "color", "is", "the", "shape", "one", "there", "a", "how", "many",
        "shapes", "are", "?", "yes", "no", BACKGROUND_WORD,
    }
    words |= set(COLORS) | set(SHAPES) | set(COUNT_WORDS)
    return sorted(words)


def _shape_mask(shape: str, cy: float, cx: float, size: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Boolean (H, W) mask of one shape whose bounding box has side ``size``."""
    half = size / 2.0
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= half**2
    if shape == "square":
        return (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)
    if shape == "triangle":  # apex up, base at the bottom of the box
        top, bottom = cy - half, cy + half
        frac = (yy - top) / max(size, 1e-6)  # 0 at apex, 1 at base
        inside_y = (yy >= top) & (yy <= bottom)
        return inside_y & (np.abs(xx - cx) <= frac * half)
    raise ValueError(f"unknown shape {shape!r}")


def _outline_mask(
    shape: str, cy: float, cx: float, size: float, stroke: float, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
    """Boolean (H, W) mask of the outline (width ``stroke``) of a shape of box side ``size``."""
    outer = _shape_mask(shape, cy, cx, size, yy, xx)
    if shape == "triangle":  # the parallel inner triangle sits lower than the box centre
        inner = _shape_mask(shape, cy + 0.45 * stroke, cx, size - 3.2 * stroke, yy, xx)
    else:
        inner = _shape_mask(shape, cy, cx, size - 2 * stroke, yy, xx)
    return outer & ~inner


def _side_and_stroke(shape: str, area: float, rng: np.random.Generator) -> tuple[float, float]:
    """(side, stroke) of an outline of roughly ``area`` pixels within the allowed ranges."""
    c = _RING_FACTOR[shape]
    w_lo = max(_STROKE_RANGE[0], area / (c * _SIDE_RANGE[1]))
    w_hi = min(_STROKE_RANGE[1], area / (c * _SIDE_RANGE[0]))
    stroke = float(rng.uniform(w_lo, max(w_lo, w_hi)))
    side = float(np.clip(area / (c * stroke), *_SIDE_RANGE))
    return side, stroke


def render_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """Draw a random scene with ``rng`` (1..MAX_OBJECTS objects, distinct colours)."""
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5  # (H, W) each
    while True:
        total = rng.uniform(*_AREA_RANGE)
        parts = rng.dirichlet(np.full(n, 3.0)) * total
        colors = list(rng.permutation(list(COLORS))[:n])
        shapes = [SHAPES[i] for i in rng.integers(0, len(SHAPES), size=n)]
        object_map = np.full((IMAGE_SIZE, IMAGE_SIZE), -1, dtype=np.int64)  # (H, W)
        objects: list[SceneObject] = []
        ok = True
        for i in range(n):
            side, stroke = _side_and_stroke(shapes[i], float(parts[i]), rng)
            placed = False
            for _ in range(60):
                lo, hi = side / 2 + 1, IMAGE_SIZE - side / 2 - 1
                cy, cx = rng.uniform(lo, hi), rng.uniform(lo, hi)
                # bounding boxes (plus a 2-pixel gap) must not overlap
                if all(abs(cy - o.cy) * 2 >= side + o.size + 4 or abs(cx - o.cx) * 2 >= side + o.size + 4
                       for o in objects):
                    mask = _outline_mask(shapes[i], cy, cx, side, stroke, yy, xx)  # (H, W)
                    object_map[mask] = i
                    objects.append(SceneObject(str(colors[i]), shapes[i], float(cy), float(cx), side, stroke))
                    placed = True
                    break
            if not placed:
                ok = False
                break
        if ok:
            break
    noise = rng.normal(0.0, BG_NOISE, size=(IMAGE_SIZE, IMAGE_SIZE, 3))  # (H, W, 3)
    image = np.clip(BG_LEVEL + noise, 0, 255)  # (H, W, 3)
    for i, obj in enumerate(objects):
        jitter = rng.normal(0.0, 8.0, size=3)
        rgb = np.clip(np.array(COLORS[obj.color], dtype=np.float64) + jitter, 0, 255)
        image[object_map == i] = rgb + rng.normal(0.0, 6.0, size=((object_map == i).sum(), 3))
    image = np.clip(image, 0, 255).astype(np.uint8)  # (H, W, 3)
    return Scene(image=image, objects=objects, object_map=object_map, patch_labels=patch_labels(object_map))


def patch_labels(object_map: np.ndarray, patch: int = PATCH) -> np.ndarray:
    """Row-major per-patch object id (-1 background) from a (H, W) object map."""
    h, w = object_map.shape
    gh, gw = h // patch, w // patch
    blocks = object_map[: gh * patch, : gw * patch].reshape(gh, patch, gw, patch).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(gh * gw, patch * patch)  # (N, P*P)
    labels = np.full(gh * gw, -1, dtype=np.int64)  # (N,)
    n_obj = int(object_map.max()) + 1
    if n_obj > 0:
        counts = np.stack([(blocks == k).sum(1) for k in range(n_obj)], axis=1)  # (N, n_obj)
        best = counts.argmax(1)
        cover = counts.max(1) / float(patch * patch)
        labels[cover >= MIN_PATCH_COVER] = best[cover >= MIN_PATCH_COVER]
    return labels


def make_questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str, list[int]]]:
    """All four templates for a scene: list of (template, question, answer, target ids).

    Randomness (which object is asked about, yes/no) comes from ``rng``.
    """
    objs = scene.objects
    out: list[tuple[str, str, str, list[int]]] = []
    # color: about a shape that is unique in the scene (always exists: n<=4 may repeat shapes)
    shape_counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    unique = [i for i, o in enumerate(objs) if shape_counts[o.shape] == 1]
    if unique:
        i = int(rng.choice(unique))
        out.append(("color", f"what color is the {objs[i].shape} ?", objs[i].color, [i]))
    # shape: colours are distinct, so any object works
    i = int(rng.integers(len(objs)))
    out.append(("shape", f"what shape is the {objs[i].color} one ?", objs[i].shape, [i]))
    # exists: balanced, hard negatives share a colour or shape with a present object
    present = {(o.color, o.shape) for o in objs}
    if rng.random() < 0.5:
        i = int(rng.integers(len(objs)))
        out.append(("exists", f"is there a {objs[i].color} {objs[i].shape} ?", "yes", [i]))
    else:
        negatives = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        hard = [(c, s) for c, s in negatives if any(o.color == c or o.shape == s for o in objs)]
        pool = hard if hard and rng.random() < 0.8 else negatives
        c, s = pool[int(rng.integers(len(pool)))]
        out.append(("exists", f"is there a {c} {s} ?", "no", []))
    out.append(("count", "how many shapes are there ?", COUNT_WORDS[len(objs) - 1], list(range(len(objs)))))
    return out


def stream_rng(split: str, index: int, stream: int | None = None) -> np.random.Generator:
    """The generator owning scene ``index`` of ``split`` in a task's seed ``stream``: ``default_rng(SPLIT_SEEDS[split]
    + index)`` for the shapes task (``stream`` None), ``default_rng([SPLIT_SEEDS[split] + index, stream])`` for the
    others (clutter, video, the probes), so splits and tasks never share a scene."""
    if split not in SPLIT_SEEDS:
        raise KeyError(f"unknown split {split!r}; expected one of {list(SPLIT_SEEDS)}")
    if not 0 <= index < SPLIT_SPAN:
        raise IndexError(f"scene index {index} outside [0, {SPLIT_SPAN})")
    seed = SPLIT_SEEDS[split] + index
    return np.random.default_rng(seed if stream is None else [seed, stream])


def scene_rng(split: str, index: int) -> np.random.Generator:
    """The generator owning scene ``index`` of ``split`` (disjoint across splits)."""
    return stream_rng(split, index)


def scene_samples(split: str, index: int) -> list[Sample]:
    """All question samples (one per applicable template) for scene ``index`` of ``split``."""
    rng = scene_rng(split, index)
    scene = render_scene(rng)
    return [
        Sample(scene.image, q, a, t, scene.patch_labels, targets, scene.objects)
        for t, q, a, targets in make_questions(scene, rng)
    ]


def make_split(split: str, n_samples: int, start: int = 0) -> list[Sample]:
    """``n_samples`` samples of ``split``, cycling templates evenly.

    Sample ``k`` comes from scene ``start + k`` and asks template ``TEMPLATES[k % 4]``
    (falling back to the next available template if the scene has no unique shape).
    """
    out: list[Sample] = []
    for k in range(n_samples):
        samples = scene_samples(split, start + k)
        by_t = {s.template: s for s in samples}
        want = TEMPLATES[k % len(TEMPLATES)]
        for off in range(len(TEMPLATES)):
            t = TEMPLATES[(TEMPLATES.index(want) + off) % len(TEMPLATES)]
            if t in by_t:
                out.append(by_t[t])
                break
    return out
