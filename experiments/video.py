"""Videos for the lmms-eval model: recognise a video visual, decode it with PyAV and sample its frames
uniformly, and turn the sampled frames into processor inputs.

lmms-eval's video tasks (VideoMME, MVBench, EgoSchema, ...) hand the model each request's video as a
file path (``doc_to_visual`` returns ``[path]``), and lmms-eval 0.7.3's own ``llava_onevision`` model
decodes it itself: ``max_frames_num`` frames (default 32) at ``np.linspace(0, total - 1,
max_frames_num, dtype=int)`` (its default decord route: a video shorter than ``max_frames_num`` repeats
frames, so every video has exactly ``max_frames_num`` frames). `sample_indices` is that rule and
`read_video` decodes those frames with PyAV (the optional extra ``vtprune[video]``).

`processor_inputs` builds the model inputs of a batch: with a processor that has a video processor
(transformers builds one only where torchvision is installed) it is the processor's own
``processor(images=..., videos=..., text=...)``; without one, each frame goes through the processor's
image processor at its base resolution (crop 0 of its output: the whole frame resized, what lmms-eval's
``llava_onevision`` does with ``image_processor.preprocess(frames)``) and each video placeholder is
expanded with the processor's own ``replace_video_token``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from vtprune.framework.errors import VtpruneError

__all__ = ["VIDEO_EXTENSIONS", "DEFAULT_MAX_FRAMES", "is_video", "sample_indices", "read_video", "processor_inputs"]

#: file suffixes read as videos (those of lmms-eval's video tasks' files, and other FFmpeg containers)
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp")
#: frames per video: lmms-eval's ``llava_onevision`` default ``max_frames_num`` (and the video papers' setting)
DEFAULT_MAX_FRAMES = 32


def is_video(visual: Any) -> bool:
    """True for a path (``str`` / ``os.PathLike``) whose suffix is in `VIDEO_EXTENSIONS` (any case)."""
    if not isinstance(visual, (str, os.PathLike)):
        return False
    return Path(visual).suffix.lower() in VIDEO_EXTENSIONS


def sample_indices(total: int, count: int) -> list[int]:
    """``count`` frame indices spread uniformly over ``total`` frames, first and last included:
    ``np.linspace(0, total - 1, count, dtype=int)`` (truncation; repeats when ``total < count``)."""
    if total < 1:
        raise VtpruneError(f"a video needs at least one frame, got {total}")
    if count < 1:
        raise VtpruneError(f"max_frames_num must be >= 1, got {count}")
    return np.linspace(0, total - 1, count, dtype=int).tolist()


def _require_av() -> Any:
    try:
        import av
    except ImportError as error:
        raise VtpruneError("decoding videos needs PyAV: pip install 'vtprune[video]'") from error
    return av


def read_video(path: str | os.PathLike, max_frames: int = DEFAULT_MAX_FRAMES) -> np.ndarray:
    """The `sample_indices` frames of the video at ``path`` as RGB: (max_frames, H, W, 3) uint8.

    The frame count is the stream's; a container that does not state it is counted by decoding. Frames
    are decoded in order and only the sampled ones are kept (a long video is never held whole)."""
    av = _require_av()
    if not Path(path).is_file():
        raise VtpruneError(f"video {str(path)!r}: no such file")
    with av.open(str(path)) as container:
        total = int(container.streams.video[0].frames or 0)
        if total < 1:
            total = sum(1 for _ in container.decode(video=0))
            container.seek(0)
    wanted = sample_indices(total, max_frames)
    keep = set(wanted)
    frames: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in keep:
                frames[index] = frame.to_ndarray(format="rgb24")  # (H, W, 3)
            if index >= wanted[-1]:
                break
    if not frames:
        raise VtpruneError(f"video {str(path)!r}: no frame could be decoded")
    last = frames[max(frames)]  # a container that over-states its length: the last decoded frame stands in
    return np.stack([frames.get(i, last) for i in wanted])  # (T, H, W, 3)


def processor_inputs(
    processor: Any, texts: Sequence[str], images: Sequence[Any], videos: Sequence[np.ndarray]
) -> dict[str, Any]:
    """The batch's model inputs (``return_tensors="pt"``, left padding as the tokenizer is set):
    ``texts`` hold one image placeholder per image and one video placeholder per video, in order;
    ``images`` are PIL images, ``videos`` (T, H, W, 3) uint8 arrays, both flat over the batch."""
    if not videos:
        return dict(processor(images=list(images) or None, text=list(texts), return_tensors="pt", padding=True))
    if getattr(processor, "video_processor", None) is not None:
        return dict(processor(images=list(images) or None, videos=list(videos), text=list(texts), return_tensors="pt", padding=True))
    return _inputs_without_video_processor(processor, texts, images, videos)


def _inputs_without_video_processor(
    processor: Any, texts: Sequence[str], images: Sequence[Any], videos: Sequence[np.ndarray]
) -> dict[str, Any]:
    import torch
    from PIL import Image

    token: Optional[str] = getattr(processor, "video_token", None)
    image_processor = getattr(processor, "image_processor", None)
    if token is None or image_processor is None or not hasattr(processor, "replace_video_token"):
        raise VtpruneError(
            f"{type(processor).__name__} takes no videos here: it has no video processor (transformers builds one only "
            "with torchvision) and no image processor / video_token / replace_video_token to stand in"
        )
    clips = []
    for video in videos:
        pixels = image_processor(images=[Image.fromarray(f) for f in video], return_tensors="pt")["pixel_values"]
        clips.append(pixels[:, 0] if pixels.dim() == 5 else pixels)  # (T, 3, S, S): crop 0 = the whole frame
    video_inputs = {"pixel_values_videos": torch.stack(clips)}  # (V, T, 3, S, S)
    expanded, index = [], 0
    for text in texts:
        pieces = text.split(token)
        out = pieces[0]
        for piece in pieces[1:]:
            if index >= len(clips):
                raise VtpruneError(f"the prompts hold more video placeholders {token!r} than the {len(clips)} videos given")
            out += processor.replace_video_token(video_inputs, index) + piece
            index += 1
        expanded.append(out)
    if index != len(clips):
        raise VtpruneError(f"{len(clips)} videos but {index} video placeholders {token!r} in the prompts")
    images_only = copy.copy(processor)  # the same processor that no longer counts video placeholders (already expanded)
    images_only.video_token = None
    inputs = dict(images_only(images=list(images) or None, text=expanded, return_tensors="pt", padding=True))
    inputs["pixel_values_videos"] = video_inputs["pixel_values_videos"]
    return inputs
