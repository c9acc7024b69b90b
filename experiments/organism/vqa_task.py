"""The organism's synthetic VQA as an experiments task (same interface as `jsonl` / `lmms_eval`).

Besides accuracy (overall and per question template) it scores what a pruning method kept:
``target_kept`` is 1 when every object the question is about still has at least one visual
token after pruning (a diagnostic no real benchmark gives), reported for questions that have
target objects.

``scenes="video"`` (``video_task``): each sample holds one video (``Sample.videos``, no image) of the shapes with
one moving; ``target_kept`` then counts the kept tokens of the whole video (frame pairs x patches).
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

from vtprune.experiments.samples import Sample, exact_match

from .clutter import CLUTTER_TEMPLATES, make_clutter_split
from .crowd import CROWD_TEMPLATES, make_crowd_split
from .task import TEMPLATES, make_split
from .video_task import VIDEO_TEMPLATES, make_video_split

__all__ = ["ORGANISM_SCENES", "OrganismTask", "organism_split"]

#: the organism's tasks, each with its split maker and question templates: ``shapes`` (1-4 outlined shapes, task.py),
#: ``clutter`` (one target among 12-20 small distractors, clutter.py), ``crowd`` (4-8 identical targets among
#: distractors, crowd.py) and ``video`` (2-3 shapes, one moving,
#: video_task.py; the video organism)
_SCENES = {
    "shapes": (make_split, TEMPLATES),
    "clutter": (make_clutter_split, CLUTTER_TEMPLATES),
    "crowd": (make_crowd_split, CROWD_TEMPLATES),
    "video": (make_video_split, VIDEO_TEMPLATES),
}
ORGANISM_SCENES: tuple[str, ...] = tuple(_SCENES)


def organism_split(scenes: str, split: str, n: int, start: int = 0) -> list:
    """The task's own samples (``task.Sample`` / ``video_task.VideoSample``): ``n`` from scene ``start`` of ``split``."""
    if scenes not in ORGANISM_SCENES:
        raise ValueError(f"unknown organism scenes {scenes!r}; expected one of {list(ORGANISM_SCENES)}")
    return _SCENES[scenes][0](split, n, start)


class OrganismTask:
    """Deterministic questions about rendered scenes of coloured shapes.

    Args:
        split: "train", "validation" or "test".
        n: number of questions (templates cycle evenly: colour, shape, exists, count; clutter: shape,
            colour, exists; crowd: shape; video: moving_color, moving_shape, is_moving, count).
        start: index of the first scene.
        scenes: ``"shapes"`` (the original task), ``"clutter"`` (docs/demo.md, the clutter task), ``"crowd"``
            (docs/demo.md, the crowd task) or ``"video"`` (docs/demo.md, the video task).
    """

    metric = "exact_match"
    max_new_tokens = 2

    def __init__(self, split: str = "test", n: int = 200, start: int = 0, scenes: str = "shapes") -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if scenes not in ORGANISM_SCENES:
            raise ValueError(f"unknown organism scenes {scenes!r}; expected one of {list(ORGANISM_SCENES)}")
        self.split, self.n, self.start, self.scenes = split, n, start, scenes
        self._labels: dict[str, tuple[list[int], list[int]]] = {}

    def samples(self, limit: Optional[int] = None) -> Iterator[Sample]:
        count = self.n if limit is None else min(int(limit), self.n)
        make = _SCENES[self.scenes][0]
        for offset, item in enumerate(make(self.split, count, self.start)):
            sample_id = f"{self.split}-{self.start + offset}"
            self._labels[sample_id] = (item.patch_labels.tolist(), list(item.target_objects))
            meta = {"template": item.template}
            if self.scenes == "video":
                yield Sample(sample_id, [], item.question, [item.answer], meta, videos=[item.frames])
            else:
                yield Sample(sample_id, [item.image], item.question, [item.answer], meta)

    def answer(self, sample: Sample, prediction: str) -> str:
        """The answer this task scores: the first generated word (``""`` when there is none)."""
        words = prediction.split()
        return words[0] if words else ""

    def score(self, sample: Sample, prediction: str) -> dict[str, float]:
        correct = exact_match(self.answer(sample, prediction), sample.answers)
        return {"exact_match": correct, f"exact_match/{sample.meta['template']}": correct}

    def selection_scores(self, sample: Sample, kept_indices: Sequence[Sequence[int]]) -> dict[str, float]:
        """``target_kept``: every target object keeps at least one of its visual tokens."""
        labels, targets = self._labels.get(str(sample.id), ([], []))
        if not targets or not kept_indices:
            return {}
        kept_objects = {labels[i] for i in kept_indices[0] if 0 <= i < len(labels)}
        return {"target_kept": float(all(t in kept_objects for t in targets))}

    def templates(self) -> tuple[str, ...]:
        return _SCENES[self.scenes][1]
