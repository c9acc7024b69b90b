"""The organism's third task, ``crowd``: the answer is spread over several identical tokens (issue 18).

Evaluated with the clutter organism (``weights_clutter/``) as it is: no new word, no training.

Contract
--------
* Same images (64x64 RGB, dark noisy background), vocabulary, processor and ``Sample`` type as the
  other tasks; the layout of ``clutter`` (``clutter.CLUTTER_OBJECTS`` = 12-20 small filled shapes, one
  per ``PATCH x PATCH`` grid cell, so every object is exactly one visual token;
  ``clutter.render_one_token_objects``).
* A crowd scene holds a **crowd**: ``CROWD_SIZE`` (4-8, uniform) copies of one kind ``(c*, s*)``
  (objects ``0 .. m-1``); ``c*`` is unique to the crowd. The other objects are distractors of the three
  other colours and uniform shapes (so some share ``s*``), drawn as in ``clutter``'s colour mode.
* One template, ``shape``: "what shape is the <c*> one ?" (clutter's wording: the vocabulary has no
  plural pronoun), answer ``s*``; ``target_objects`` = the whole crowd.
* Why it exists: farthest-point selection seeded with one crowd member never picks another (they are
  near-identical tokens), while prompt relevance ranks the whole crowd first; the measured curves
  (docs/demo.md, "The crowd task") show the answer improving with the number of crowd tokens kept.
* Deterministic: scene ``i`` of split ``s`` is drawn from ``numpy.random.default_rng([SPLIT_SEEDS[s] + i,
  CROWD_STREAM])`` (shapes: none, clutter: 1, large target / video: 2, group probe: 3), disjoint across
  splits. ``make_crowd_split(split, n, start)``: sample ``k`` asks about scene ``start + k``.
"""

from __future__ import annotations

import numpy as np

from .clutter import CLUTTER_OBJECTS, render_one_token_objects
from .task import COLORS, SHAPES, Sample, Scene, stream_rng

__all__ = [
    "CROWD_SIZE",
    "CROWD_STREAM",
    "CROWD_TEMPLATES",
    "crowd_rng",
    "crowd_sample",
    "make_crowd_split",
    "render_crowd_scene",
]

CROWD_TEMPLATES: tuple[str, ...] = ("shape",)
CROWD_SIZE: tuple[int, int] = (4, 8)  # inclusive range of crowd members
CROWD_STREAM = 4  # second seed entry (shapes: none, clutter: 1, large target / video: 2, group probe: 3)


def crowd_rng(split: str, index: int) -> np.random.Generator:
    """The generator owning crowd scene ``index`` of ``split``."""
    return stream_rng(split, index, CROWD_STREAM)


def render_crowd_scene(rng: np.random.Generator) -> tuple[Scene, int]:
    """(scene, crowd size m): objects ``0 .. m-1`` are the crowd, the rest distractors (module doc)."""
    m = int(rng.integers(CROWD_SIZE[0], CROWD_SIZE[1] + 1))
    n = int(rng.integers(max(CLUTTER_OBJECTS[0], m + 1), CLUTTER_OBJECTS[1] + 1))
    color = str(rng.choice(list(COLORS)))
    shape = str(rng.choice(list(SHAPES)))
    others = [(c, s) for c in COLORS if c != color for s in SHAPES]
    kinds = [(color, shape)] * m + [others[int(i)] for i in rng.integers(0, len(others), size=n - m)]
    return render_one_token_objects(rng, kinds), m


def crowd_sample(split: str, index: int) -> Sample:
    """The question of crowd scene ``index`` of ``split``."""
    scene, m = render_crowd_scene(crowd_rng(split, index))
    crowd = scene.objects[0]
    question = f"what shape is the {crowd.color} one ?"
    return Sample(scene.image, question, crowd.shape, "shape", scene.patch_labels, list(range(m)), scene.objects)


def make_crowd_split(split: str, n_samples: int, start: int = 0) -> list[Sample]:
    """``n_samples`` crowd samples of ``split``: sample ``k`` is the question of scene ``start + k``."""
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    return [crowd_sample(split, k) for k in range(start, start + n_samples)]
