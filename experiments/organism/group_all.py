"""A probe for issue 18: "are all the <c> shapes <s> ?", a question that needs SEVERAL relevant tokens.

Measured, not a shipped task (docs/demo.md, "What would make relevance win (tried, not shipped)").

Contract
--------
* Scene (``render_group_scene(rng, yes)``): the clutter layout (``clutter.CLUTTER_OBJECTS`` = 12-20
  small filled one-token shapes, ``clutter.render_one_token_objects``), of which ``GROUP_SIZE`` = 4-7
  share one colour ``c`` (the *group*: objects ``0 .. k-1``); the others have the three other colours
  and uniform shapes. ``yes``: every group member has shape ``s``; otherwise exactly one member
  (uniform) has another shape (uniform among the other two).
* Question (template ``"all"``): "are all the <c> shapes <s> ?", answer yes / no; its targets are the
  whole group (the prompt names ``c`` and ``s``, so relevance ranks every group member high).
* Vocabulary: ``GROUP_WORDS`` = ("all",) appended AFTER every existing id
  (``processor.build_tokenizer(extra_words=GROUP_WORDS)``); ``grow_vocabulary(model)`` adds the rows to a
  model (tied embeddings; each new row a copy of ``INIT_FROM``'s). The shapes organism (``weights/``)
  and its tokenizer are untouched.
* Deterministic: group scene ``i`` of split ``s`` comes from ``default_rng([SPLIT_SEEDS[s] + i,
  GROUP_STREAM])`` (shapes: none, clutter: 1, large target: 2). ``make_group_split(split, n)``: scene ``i``
  is a yes scene iff ``i`` is even (balanced). ``make_whole_split(split, n)``: the clutter task with the
  new template, ``n // 4`` group questions after ``make_clutter_split(split, n - n // 4)`` (the three
  clutter templates' scenes and seeds unchanged).
* Training (``GroupBatcher``): the ``mixed`` batches (clutter + shapes rehearsal) with the clutter scene
  of every index ``i % 6 in GROUP_SLOTS`` replaced by a group scene (``group_training_scene``), whose
  turns are its ``all`` question and "is there a <c> <s'> ?" for each shape ``s'`` (yes iff a group member
  has shape ``s'``; targets: those members).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .batching import TrainBatcher
from .clutter import CLUTTER_OBJECTS, render_one_token_objects
from .processor import build_processor, build_tokenizer
from .task import (
    COLORS,
    SHAPES,
    SPLIT_SEEDS,
    Sample,
    Scene,
    stream_rng,
)
from .clutter import make_clutter_split

__all__ = [
    "GROUP_SIZE",
    "GROUP_SLOTS",
    "GROUP_STREAM",
    "GROUP_WORDS",
    "INIT_FROM",
    "GroupBatcher",
    "build_group_processor",
    "group_question",
    "group_rng",
    "group_training_scene",
    "grow_vocabulary",
    "make_group_split",
    "make_whole_split",
    "render_group_scene",
]

GROUP_WORDS: tuple[str, ...] = ("all",)
INIT_FROM = "are"  # the new word's embedding starts as a copy of this word's (the question's verb)
GROUP_SIZE: tuple[int, int] = (4, 7)  # inclusive range of group members
GROUP_STREAM = 3  # second seed entry (shapes: none, clutter: 1, large target: 2)
GROUP_SLOTS: tuple[int, ...] = (0, 2)  # training index i % 6 in these: a group scene (else mixed's own)
_SLOT_PERIOD = 6


def group_rng(split: str, index: int) -> np.random.Generator:
    """The generator owning group scene ``index`` of ``split``."""
    return stream_rng(split, index, GROUP_STREAM)


def render_group_scene(rng: np.random.Generator, yes: bool) -> tuple[Scene, str, str]:
    """(scene, group colour c, asked shape s); objects ``0 .. k-1`` are the group (see module doc)."""
    n = int(rng.integers(CLUTTER_OBJECTS[0], CLUTTER_OBJECTS[1] + 1))
    k = int(rng.integers(GROUP_SIZE[0], GROUP_SIZE[1] + 1))
    color = str(rng.choice(list(COLORS)))
    shape = str(rng.choice(list(SHAPES)))
    kinds = [(color, shape)] * k
    if not yes:
        odd = int(rng.integers(k))
        others = [s for s in SHAPES if s != shape]
        kinds[odd] = (color, others[int(rng.integers(len(others)))])
    rest = [c for c in COLORS if c != color]
    kinds += [(rest[int(rng.integers(len(rest)))], SHAPES[int(rng.integers(len(SHAPES)))]) for _ in range(n - k)]
    return render_one_token_objects(rng, kinds), color, shape


def group_question(scene: Scene, color: str, shape: str) -> tuple[str, str, str, list[int]]:
    """(template "all", question, answer, target ids = the group) of a group scene."""
    group = [i for i, o in enumerate(scene.objects) if o.color == color]
    answer = "yes" if all(scene.objects[i].shape == shape for i in group) else "no"
    return "all", f"are all the {color} shapes {shape} ?", answer, group


def _group_sample(split: str, index: int) -> Sample:
    scene, color, shape = render_group_scene(group_rng(split, index), yes=index % 2 == 0)
    t, q, a, targets = group_question(scene, color, shape)
    return Sample(scene.image, q, a, t, scene.patch_labels, targets, scene.objects)


def make_group_split(split: str, n_samples: int, start: int = 0) -> list[Sample]:
    """``n_samples`` group questions of ``split`` (scenes ``start ..``; even scenes are yes scenes)."""
    return [_group_sample(split, i) for i in range(start, start + n_samples)]


def make_whole_split(split: str, n_samples: int) -> list[Sample]:
    """The clutter task with the ``all`` template: the three clutter templates, then ``n // 4`` group questions."""
    n_group = n_samples // 4
    return make_clutter_split(split, n_samples - n_group) + make_group_split(split, n_group)


def group_training_scene(split: str, index: int) -> tuple[Scene, list[tuple[str, str, str, list[int]]], np.random.Generator]:
    """A training group scene (yes / no drawn from its own generator) with its ``all`` and exists questions."""
    rng = group_rng(split, index)
    scene, color, shape = render_group_scene(rng, yes=bool(rng.random() < 0.5))
    questions = [group_question(scene, color, shape)]
    for s in SHAPES:
        members = [i for i, o in enumerate(scene.objects) if (o.color, o.shape) == (color, s)]
        questions.append(("exists", f"is there a {color} {s} ?", "yes" if members else "no", members))
    return scene, questions, rng


def build_group_processor():
    """The clutter organism's processor with ``GROUP_WORDS`` appended to its tokenizer."""
    return build_processor(extra_words=GROUP_WORDS)


def grow_vocabulary(model) -> list[str]:
    """Append rows for the new words to the model's (tied) embeddings, each a copy of ``INIT_FROM``'s."""
    import torch

    vocab = build_tokenizer(extra_words=GROUP_WORDS).get_vocab()
    old = model.get_input_embeddings().weight.shape[0]
    if old == len(vocab):
        return []
    if old != len(build_tokenizer().get_vocab()):
        raise ValueError(f"model has {old} embedding rows; expected the organism's {len(build_tokenizer().get_vocab())}")
    model.resize_token_embeddings(len(vocab), mean_resizing=False)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight  # (V, D)
        emb[old:] = emb[vocab[INIT_FROM]]
    return [w for w, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i >= old]


class GroupBatcher(TrainBatcher):
    """``mixed`` training batches with a group scene at every index ``i % 6 in GROUP_SLOTS``."""

    def __init__(self, turns: int = 4, split: str = "train") -> None:
        super().__init__(turns=turns, split=split, task="mixed")
        self.vocab = build_tokenizer(extra_words=GROUP_WORDS).get_vocab()

    def _scene(self, idx: int) -> tuple[Scene, Callable[[], list], np.random.Generator]:
        if idx % _SLOT_PERIOD in GROUP_SLOTS:
            scene, qs, rng = group_training_scene(self.split, idx)
            return scene, lambda: list(qs), rng
        return super()._scene(idx)
