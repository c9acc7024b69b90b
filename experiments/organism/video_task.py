"""The organism's video task: a few outlined shapes, one of them moving in a straight line.

Contract
--------
* A video is ``N_FRAMES`` RGB frames of ``FRAME_SIZE`` x ``FRAME_SIZE`` px (the shapes task's look: outlined
  shapes of distinct colours on the dark noisy background, ``task.py``). It holds 2 or 3 objects; exactly one
  (the **mover**, drawn uniformly among them) moves at constant velocity along a straight line (speed
  ``_SPEED_RANGE`` px per frame, any direction), the others stay still. The background and the still objects
  are pixel-identical in every frame (only the mover changes pixels), the mover's path keeps a gap to every
  still object and stays inside the frame.
* Size: the Qwen2-VL organism pairs frames in time (temporal patch 2) and merges 2 x 2 patches, and its
  processor scales a scene so that one merged token covers one ``PATCH`` x ``PATCH`` scene patch (as for
  images): a video is ``N_FRAMES / 2`` x ``(FRAME_SIZE / PATCH) ** 2`` = 4 x 36 = ``VIDEO_TOKENS`` = 144 merged
  tokens (an image of the shapes task is 64).
* ``patch_labels`` (``VIDEO_TOKENS``,): for each merged token (time-major, then row-major, the order of the
  model's video tokens) the id of the object covering it in either frame of its frame pair (``task.patch_labels``
  rule), else -1.
* Questions (single-word answers; ``VIDEO_TEMPLATES``):
  ``moving_color`` "what color is the moving shape ?"  (answers: the four colours)
  ``moving_shape`` "what shape is moving ?"            (circle / square / triangle)
  ``is_moving``    "is the <color> one moving ?"       (balanced yes / no: "no" asks about a still object)
  ``count``        "how many shapes are there ?"       (two / three)
  ``target_objects``: the mover for the first two and for "yes", the still object for "no", all for count.
* New word: ``VIDEO_WORDS`` = ("moving",), appended after the shapes task's vocabulary by the video organism's
  tokenizer (``qwen_video.video_vocabulary``), so every existing token id is unchanged.
* Deterministic and disjoint: video ``i`` of split ``s`` is drawn from
  ``numpy.random.default_rng([SPLIT_SEEDS[s] + i, VIDEO_STREAM])`` (a stream distinct from the shapes and
  clutter tasks'). ``make_video_split(split, n)``: sample ``k`` asks template ``k % 4`` of video ``start + k``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .task import (
    BG_LEVEL,
    BG_NOISE,
    COLORS,
    COUNT_WORDS,
    PATCH,
    SHAPES,
    SPLIT_SEEDS,
    _outline_mask,
    patch_labels,
    SceneObject,
    stream_rng,
)

__all__ = [
    "FRAME_SIZE", "N_FRAMES", "TEMPORAL_PAIR", "VIDEO_OBJECTS", "VIDEO_STREAM", "VIDEO_TEMPLATES", "VIDEO_TOKENS",
    "VIDEO_WORDS", "Video", "VideoSample", "make_video_split", "render_video", "video_questions", "video_rng",
    "video_samples",
]

FRAME_SIZE = 48
N_FRAMES = 8
TEMPORAL_PAIR = 2  # frames per temporal patch of the Qwen2-VL organism (qwen_processor.QWEN_TEMPORAL_PATCH)
TOKENS_PER_PAIR = (FRAME_SIZE // PATCH) ** 2  # 36
VIDEO_TOKENS = N_FRAMES // TEMPORAL_PAIR * TOKENS_PER_PAIR  # 144
VIDEO_OBJECTS: tuple[int, int] = (2, 3)  # inclusive range of objects per video
VIDEO_STREAM = 2  # second entry of the seed sequence (shapes: none, clutter: 1)
VIDEO_TEMPLATES: tuple[str, ...] = ("moving_color", "moving_shape", "is_moving", "count")
VIDEO_WORDS: tuple[str, ...] = ("moving",)
_SIDE_RANGE = (11.0, 16.0)
_STROKE_RANGE = (2.0, 3.0)
_SPEED_RANGE = (2.5, 3.5)  # px per frame: 17-25 px over the video, 2-3 patches; 5-7 px (most of a patch) per frame pair
_GAP = 3.0  # px between the mover's path and any still object's box
_MAX_TRIES = 200


@dataclass
class Video:
    """A rendered video: frames, objects (one per id), the mover's id and per-frame object maps."""

    frames: np.ndarray  # (T, H, W, 3) uint8
    objects: list[SceneObject]  # position = the object's first-frame centre
    mover: int
    object_maps: np.ndarray  # (T, H, W) int, object id or -1
    patch_labels: np.ndarray  # (VIDEO_TOKENS,) int, object id or -1
    velocity: tuple[float, float] = (0.0, 0.0)  # (dy, dx) px per frame


@dataclass
class VideoSample:
    """One question about one video (``frames`` (T, H, W, 3) uint8); fields as ``task.Sample``."""

    frames: np.ndarray
    question: str
    answer: str
    template: str
    patch_labels: np.ndarray
    target_objects: list[int] = field(default_factory=list)
    objects: list[SceneObject] = field(default_factory=list)
    mover: int = 0


def video_rng(split: str, index: int) -> np.random.Generator:
    """The generator owning video ``index`` of ``split`` (disjoint across splits and from the image tasks)."""
    return stream_rng(split, index, VIDEO_STREAM)


def _apart(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """Boxes (cy, cx, side) separated by at least ``_GAP`` along y or x."""
    return abs(a[0] - b[0]) * 2 >= a[2] + b[2] + 2 * _GAP or abs(a[1] - b[1]) * 2 >= a[2] + b[2] + 2 * _GAP


def _layout(rng: np.random.Generator, n: int) -> tuple[list[tuple[float, float, float]], tuple[float, float]] | None:
    """Boxes (cy, cx, side) at frame 0 (object 0 moves) and the velocity, or None when the draw does not fit."""
    side0 = float(rng.uniform(*_SIDE_RANGE))
    angle, speed = float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(*_SPEED_RANGE))
    vy, vx = speed * np.sin(angle), speed * np.cos(angle)
    span_y, span_x = vy * (N_FRAMES - 1), vx * (N_FRAMES - 1)
    lo, hi = side0 / 2 + 1, FRAME_SIZE - side0 / 2 - 1
    # the start is drawn so that the end is inside the frame too
    y_lo, y_hi = max(lo, lo - span_y), min(hi, hi - span_y)
    x_lo, x_hi = max(lo, lo - span_x), min(hi, hi - span_x)
    if y_lo > y_hi or x_lo > x_hi:
        return None
    cy, cx = float(rng.uniform(y_lo, y_hi)), float(rng.uniform(x_lo, x_hi))
    path = [(cy + vy * t, cx + vx * t, side0) for t in range(N_FRAMES)]
    boxes = [path[0]]
    for _ in range(1, n):
        side = float(rng.uniform(*_SIDE_RANGE))
        for _ in range(60):
            lo, hi = side / 2 + 1, FRAME_SIZE - side / 2 - 1
            box = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)), side)
            if all(_apart(box, p) for p in path) and all(_apart(box, b) for b in boxes[1:]):
                boxes.append(box)
                break
        else:
            return None
    return boxes, (float(vy), float(vx))


def render_video(rng: np.random.Generator) -> Video:
    """Draw a random video with ``rng`` (see the module contract)."""
    n = int(rng.integers(VIDEO_OBJECTS[0], VIDEO_OBJECTS[1] + 1))
    for _ in range(_MAX_TRIES):
        drawn = _layout(rng, n)
        if drawn is not None:
            break
    else:  # pragma: no cover - the ranges above always fit within a few tries
        raise RuntimeError("no video layout found")
    boxes, (vy, vx) = drawn
    colors = [str(c) for c in rng.permutation(list(COLORS))[:n]]
    shapes = [SHAPES[int(i)] for i in rng.integers(0, len(SHAPES), size=n)]
    strokes = [float(rng.uniform(*_STROKE_RANGE)) for _ in range(n)]
    objects = [SceneObject(colors[i], shapes[i], b[0], b[1], b[2], strokes[i]) for i, b in enumerate(boxes)]
    # the mover is object 0 of the layout; shuffle ids so that it is uniform among the objects
    order = rng.permutation(n)
    objects = [objects[int(i)] for i in order]
    mover = int(np.flatnonzero(order == 0)[0])
    yy, xx = np.mgrid[0:FRAME_SIZE, 0:FRAME_SIZE].astype(np.float32) + 0.5  # (H, W) each
    still_map = np.full((FRAME_SIZE, FRAME_SIZE), -1, dtype=np.int64)  # (H, W)
    base = np.clip(BG_LEVEL + rng.normal(0.0, BG_NOISE, size=(FRAME_SIZE, FRAME_SIZE, 3)), 0, 255)  # (H, W, 3)
    rgbs = [np.clip(np.array(COLORS[o.color], dtype=np.float64) + rng.normal(0.0, 8.0, size=3), 0, 255) for o in objects]
    for k, obj in enumerate(objects):
        if k == mover:
            continue
        mask = _outline_mask(obj.shape, obj.cy, obj.cx, obj.size, obj.stroke, yy, xx)  # (H, W)
        still_map[mask] = k
        base[mask] = rgbs[k] + rng.normal(0.0, 6.0, size=(int(mask.sum()), 3))
    m = objects[mover]
    mover_noise = rng.normal(0.0, 6.0, size=(FRAME_SIZE, FRAME_SIZE, 3))  # (H, W, 3): texture moves with nothing
    frames, maps = [], []
    for t in range(N_FRAMES):
        mask = _outline_mask(m.shape, m.cy + vy * t, m.cx + vx * t, m.size, m.stroke, yy, xx)  # (H, W)
        frame = base.copy()  # (H, W, 3)
        frame[mask] = rgbs[mover] + mover_noise[mask]
        omap = still_map.copy()  # (H, W)
        omap[mask] = mover
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
        maps.append(omap)
    object_maps = np.stack(maps)  # (T, H, W)
    return Video(np.stack(frames), objects, mover, object_maps, video_patch_labels(object_maps), (vy, vx))


def video_patch_labels(object_maps: np.ndarray) -> np.ndarray:
    """(VIDEO_TOKENS,) object id per merged video token: per frame pair, the pair's union map (later frame wins)."""
    labels = []
    for t in range(0, object_maps.shape[0], TEMPORAL_PAIR):
        pair = object_maps[t].copy()  # (H, W)
        for later in object_maps[t + 1 : t + TEMPORAL_PAIR]:
            pair[later >= 0] = later[later >= 0]
        labels.append(patch_labels(pair))
    return np.concatenate(labels)  # (T/2 * N,)


def video_questions(video: Video, rng: np.random.Generator) -> list[tuple[str, str, str, list[int]]]:
    """All four templates for ``video``: list of (template, question, answer, target ids)."""
    objs, mover = video.objects, video.mover
    still = [k for k in range(len(objs)) if k != mover]
    out = [
        ("moving_color", "what color is the moving shape ?", objs[mover].color, [mover]),
        ("moving_shape", "what shape is moving ?", objs[mover].shape, [mover]),
    ]
    if rng.random() < 0.5:
        out.append(("is_moving", f"is the {objs[mover].color} one moving ?", "yes", [mover]))
    else:
        k = still[int(rng.integers(len(still)))]
        out.append(("is_moving", f"is the {objs[k].color} one moving ?", "no", [k]))
    out.append(("count", "how many shapes are there ?", COUNT_WORDS[len(objs) - 1], list(range(len(objs)))))
    return out


def video_samples(split: str, index: int) -> list[VideoSample]:
    """The four question samples of video ``index`` of ``split``."""
    rng = video_rng(split, index)
    video = render_video(rng)
    return [
        VideoSample(video.frames, q, a, t, video.patch_labels, targets, video.objects, video.mover)
        for t, q, a, targets in video_questions(video, rng)
    ]


def make_video_split(split: str, n_samples: int, start: int = 0) -> list[VideoSample]:
    """``n_samples`` samples of ``split``: sample ``k`` asks template ``k % 4`` of video ``start + k``."""
    out = []
    for k in range(start, start + n_samples):
        want = VIDEO_TEMPLATES[k % len(VIDEO_TEMPLATES)]
        out.append(next(s for s in video_samples(split, k) if s.template == want))
    return out
