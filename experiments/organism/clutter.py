"""The organism's second task, ``clutter``: one target among many small distractors.

Contract
--------
* Same images (64x64 RGB, dark noisy background), vocabulary, processor and ``Sample``
  type as ``task.py``; only the scenes and questions differ, so the same LLaVA organism
  (``processor.build_processor``) reads both tasks.
* A clutter scene puts ``CLUTTER_OBJECTS`` (12-20) small *filled* shapes, one per
  ``PATCH x PATCH`` grid cell (side 5-7 px, jittered inside its cell, so every object is
  exactly one visual token), on random cells. One object is the **target** with kind
  ``(c*, s*)``. Either its colour is unique in the scene (mode ``"color"``: every
  distractor has another colour) or its shape is (mode ``"shape"``), and no distractor
  repeats the target's kind. Distractor kinds are drawn uniformly from the allowed kinds,
  so a scene typically shows 6-9 distinct colour/shape kinds: selecting diverse tokens
  covers many kinds but, at small budgets, usually not the one the question names.
* Question templates (single-word answers, the existing vocabulary):
  ``shape``  "what shape is the <c*> one ?"  (mode "color": the colour is unique)
  ``color``  "what color is the <s*> ?"      (mode "shape": the shape is unique)
  ``exists`` "is there a <c> <s> ?"          (balanced: yes = the target's kind; no = a
             kind absent from the scene that shares the unique attribute, a hard negative)
  ``target_objects`` is ``[target]`` (``[]`` for "no").
* Deterministic: scene ``i`` of split ``s`` is drawn from
  ``numpy.random.default_rng([SPLIT_SEEDS[s] + i, CLUTTER_STREAM])`` (a stream distinct
  from the shapes task's, disjoint across splits). ``make_clutter_split(split, n)``
  cycles ``CLUTTER_TEMPLATES``; scene ``k`` is built for template ``k % 3``.
"""

from __future__ import annotations

import numpy as np

from .task import (
    BG_LEVEL,
    BG_NOISE,
    COLORS,
    IMAGE_SIZE,
    PATCH,
    SHAPES,
    SPLIT_SEEDS,
    _shape_mask,
    patch_labels,
    Sample,
    Scene,
    SceneObject,
    stream_rng,
)

__all__ = [
    "CLUTTER_OBJECTS",
    "CLUTTER_STREAM",
    "CLUTTER_TEMPLATES",
    "clutter_questions",
    "clutter_rng",
    "clutter_scene_samples",
    "clutter_training_scene",
    "make_clutter_split",
    "render_clutter_scene",
    "render_one_token_objects",
]

CLUTTER_TEMPLATES: tuple[str, ...] = ("shape", "color", "exists")
CLUTTER_OBJECTS: tuple[int, int] = (12, 20)  # inclusive range of objects per scene
CLUTTER_STREAM = 1  # second entry of the seed sequence: keeps clutter scenes apart from shapes scenes
_SIDE_RANGE = (5.0, 7.0)  # filled shapes fit inside one 8-px patch
_COLOR_JITTER = 8.0
_PIXEL_NOISE = 6.0
_GRID = IMAGE_SIZE // PATCH
_MODES = ("color", "shape")  # which attribute of the target is unique in the scene


def clutter_rng(split: str, index: int) -> np.random.Generator:
    """The generator owning clutter scene ``index`` of ``split``."""
    return stream_rng(split, index, CLUTTER_STREAM)


def _allowed_kinds(target: tuple[str, str], mode: str) -> list[tuple[str, str]]:
    """Distractor kinds: never the target's kind, and never its unique attribute."""
    c0, s0 = target
    kinds = [(c, s) for c in COLORS for s in SHAPES if (c, s) != target]
    if mode == "color":
        return [(c, s) for c, s in kinds if c != c0]
    return [(c, s) for c, s in kinds if s != s0]


def render_clutter_scene(rng: np.random.Generator, mode: str) -> Scene:
    """A clutter scene whose object 0 is the target, unique in ``mode`` ("color" / "shape")."""
    if mode not in _MODES:
        raise ValueError(f"unknown clutter mode {mode!r}; expected one of {list(_MODES)}")
    n = int(rng.integers(CLUTTER_OBJECTS[0], CLUTTER_OBJECTS[1] + 1))
    target = (str(rng.choice(list(COLORS))), str(rng.choice(list(SHAPES))))
    allowed = _allowed_kinds(target, mode)
    kinds = [target] + [allowed[int(i)] for i in rng.integers(0, len(allowed), size=n - 1)]
    return render_one_token_objects(rng, kinds)


def render_one_token_objects(rng: np.random.Generator, kinds: list[tuple[str, str]]) -> Scene:
    """A scene of one small filled shape per ``(colour, shape)`` of ``kinds`` (object ``k`` = ``kinds[k]``),
    each on its own random grid cell (one visual token), over the noisy background."""
    n = len(kinds)
    cells = rng.permutation(_GRID * _GRID)[:n]
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5  # (H, W) each
    object_map = np.full((IMAGE_SIZE, IMAGE_SIZE), -1, dtype=np.int64)  # (H, W)
    objects: list[SceneObject] = []
    for k, ((color, shape), cell) in enumerate(zip(kinds, cells)):
        side = float(rng.uniform(*_SIDE_RANGE))
        slack = (PATCH - side) / 2.0  # the shape stays inside its cell
        cy = (cell // _GRID) * PATCH + PATCH / 2.0 + float(rng.uniform(-slack, slack))
        cx = (cell % _GRID) * PATCH + PATCH / 2.0 + float(rng.uniform(-slack, slack))
        object_map[_shape_mask(shape, cy, cx, side, yy, xx)] = k
        objects.append(SceneObject(color, shape, cy, cx, side, stroke=side / 2.0))
    noise = rng.normal(0.0, BG_NOISE, size=(IMAGE_SIZE, IMAGE_SIZE, 3))  # (H, W, 3)
    image = np.clip(BG_LEVEL + noise, 0, 255)  # (H, W, 3)
    for k, obj in enumerate(objects):
        where = object_map == k  # (H, W)
        rgb = np.clip(np.array(COLORS[obj.color], dtype=np.float64) + rng.normal(0.0, _COLOR_JITTER, size=3), 0, 255)
        image[where] = rgb + rng.normal(0.0, _PIXEL_NOISE, size=(int(where.sum()), 3))
    image = np.clip(image, 0, 255).astype(np.uint8)  # (H, W, 3)
    return Scene(image=image, objects=objects, object_map=object_map, patch_labels=patch_labels(object_map))


def clutter_questions(scene: Scene, mode: str, rng: np.random.Generator) -> list[tuple[str, str, str, list[int]]]:
    """The scene's questions as (template, question, answer, target ids): its attribute question and one exists."""
    target = scene.objects[0]
    out: list[tuple[str, str, str, list[int]]] = []
    if mode == "color":
        out.append(("shape", f"what shape is the {target.color} one ?", target.shape, [0]))
    else:
        out.append(("color", f"what color is the {target.shape} ?", target.color, [0]))
    if rng.random() < 0.5:
        out.append(("exists", f"is there a {target.color} {target.shape} ?", "yes", [0]))
    else:
        present = {(o.color, o.shape) for o in scene.objects}
        if mode == "color":  # same (unique) colour, another shape: absent by construction
            pool = [(target.color, s) for s in SHAPES if s != target.shape]
        else:
            pool = [(c, target.shape) for c in COLORS if c != target.color]
        pool = [k for k in pool if k not in present]
        c, s = pool[int(rng.integers(len(pool)))]
        out.append(("exists", f"is there a {c} {s} ?", "no", []))
    return out


def _scene_and_questions(split: str, index: int, mode: str) -> tuple[Scene, list[tuple[str, str, str, list[int]]], np.random.Generator]:
    rng = clutter_rng(split, index)
    scene = render_clutter_scene(rng, mode)
    return scene, clutter_questions(scene, mode, rng), rng


def clutter_scene_samples(split: str, index: int) -> list[Sample]:
    """The samples of clutter scene ``index`` (its mode follows ``CLUTTER_TEMPLATES[index % 3]``)."""
    template = CLUTTER_TEMPLATES[index % len(CLUTTER_TEMPLATES)]
    # shape questions need a unique colour, colour questions a unique shape; exists alternates
    mode = {"shape": "color", "color": "shape"}.get(template, _MODES[(index // len(CLUTTER_TEMPLATES)) % 2])
    scene, questions, _ = _scene_and_questions(split, index, mode)
    return [Sample(scene.image, q, a, t, scene.patch_labels, targets, scene.objects) for t, q, a, targets in questions]


def make_clutter_split(split: str, n_samples: int, start: int = 0) -> list[Sample]:
    """``n_samples`` clutter samples of ``split``: sample ``k`` asks template ``k % 3`` of scene ``start + k``."""
    out: list[Sample] = []
    for k in range(start, start + n_samples):
        want = CLUTTER_TEMPLATES[k % len(CLUTTER_TEMPLATES)]
        out.append(next(s for s in clutter_scene_samples(split, k) if s.template == want))
    return out


def clutter_training_scene(split: str, index: int) -> tuple[Scene, list[tuple[str, str, str, list[int]]]]:
    """A training scene (mode by ``index // 2`` parity) with its attribute question and both exists answers.

    (``index // 2``: the ``mixed`` training batches use the even indices for clutter scenes.)
    """
    mode = _MODES[(index // 2) % 2]
    scene, questions, rng = _scene_and_questions(split, index, mode)
    seen = {q for _, q, _, _ in questions}
    for _ in range(8):  # draw until the other exists answer appears too (p = 1/2 each)
        if len({a for t, _, a, _ in questions if t == "exists"}) == 2:
            break
        extra = clutter_questions(scene, mode, rng)[1]
        if extra[1] not in seen:
            questions.append(extra)
            seen.add(extra[1])
    return scene, questions
