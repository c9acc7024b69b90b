"""Videos for the Qwen2-VL organism without torchvision: tokenizer, video processor and processor.

Contract
--------
* ``video_vocabulary()`` = ``qwen_processor.qwen_vocabulary()`` + ``video_task.VIDEO_WORDS``: the new words
  come last, so every id of the image organism is unchanged; ``build_video_tokenizer()`` is the word-level
  tokenizer over it (same settings as ``build_qwen_tokenizer``).
* ``OrganismVideoProcessor(image_processor)`` turns videos ((T, H, W, 3) uint8 arrays, T even) into what the
  stock ``Qwen2VLVideoProcessor`` returns, without torchvision:
  ``pixel_values_videos`` (sum_v T_v / 2 * h * w, 3 * 2 * 14 * 14) and ``video_grid_thw`` (V, 3) = (T / 2, h, w)
  in 14 px patches, in the stock layout (per video: temporal group, then merge-window row, merge-window column,
  row and column inside the window; per patch: channel, frame of the pair, pixel row, pixel column). Each frame
  is resized and normalised by the organism's own image processor, scaled so that one merged token covers one
  ``PATCH`` x ``PATCH`` px patch of the frame as for images (a 48 px frame -> 168 px -> 12 x 12 patches). A
  video whose two frames of every pair are equal gives, per temporal group, exactly the image path's
  ``pixel_values`` of that frame (the tests check it).
* ``QwenOrganismProcessor``: ``ImageOnlyQwen2VLProcessor`` plus that ``video_processor`` (built from its image
  processor, so nothing new is saved), so ``processor(text=..., videos=[...])`` works as the stock
  ``Qwen2VLProcessor``: each ``<|video_pad|>`` expands to T/2 * h * w / 4 tokens and ``mm_token_type_ids`` marks
  them 2.
* ``build_video_prompt(question)``: the Qwen organism's prompt with the video placeholder.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from transformers import BatchFeature

from .qwen_processor import (
    CHAT_TEMPLATE, QWEN_MERGE, QWEN_PATCH, QWEN_TEMPORAL_PATCH, VIDEO_PAD, VISION_END, VISION_START,
    ImageOnlyQwen2VLProcessor, build_qwen_image_processor, build_qwen_tokenizer, qwen_vocabulary,
)
from .task import PATCH
from .video_task import VIDEO_WORDS

__all__ = [
    "OrganismVideoProcessor", "QwenOrganismProcessor", "build_video_processor", "build_video_prompt",
    "build_video_tokenizer", "video_vocabulary",
]

# scene px -> processor px: one merged token (QWEN_MERGE x QWEN_PATCH px) per PATCH x PATCH scene patch
_SCALE = QWEN_MERGE * QWEN_PATCH / PATCH


def video_vocabulary() -> list[str]:
    """The image organism's tokens in id order, then the video task's new words."""
    return qwen_vocabulary() + list(VIDEO_WORDS)


def build_video_tokenizer():
    """Word-level tokenizer over ``video_vocabulary()``."""
    return build_qwen_tokenizer(extra_words=VIDEO_WORDS)


def build_video_prompt(question: str) -> str:
    """The single-turn prompt for ``question`` about one video."""
    return f"USER: {VISION_START} {VIDEO_PAD} {VISION_END} {question} ASSISTANT:"


class OrganismVideoProcessor:
    """Videos -> ``pixel_values_videos`` / ``video_grid_thw`` in the stock Qwen2-VL layout (module doc)."""

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor
        self.patch_size = int(image_processor.patch_size)
        self.merge_size = int(image_processor.merge_size)
        self.temporal_patch_size = int(image_processor.temporal_patch_size)

    def _side(self, side: int) -> int:
        factor = self.patch_size * self.merge_size
        return max(factor, int(round(side * _SCALE / factor)) * factor)

    def _one(self, video: np.ndarray) -> tuple[torch.Tensor, list[int]]:
        frames = np.asarray(video)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"a video must be a (T, H, W, 3) uint8 array, got shape {frames.shape}")
        t, h, w = frames.shape[:3]
        tp, p = self.temporal_patch_size, self.patch_size
        if t % tp:
            raise ValueError(f"a video needs a multiple of {tp} frames (the temporal patch), got {t}")
        rh, rw = self._side(h), self._side(w)
        out = self.image_processor(
            images=list(frames), size={"shortest_edge": rh * rw, "longest_edge": rh * rw}, return_tensors="pt"
        )
        grid = out["image_grid_thw"][0].tolist()  # [1, gh, gw] for every frame
        n = grid[1] * grid[2]
        # each frame's patches repeat the frame over the temporal slots: keep slot 0, pair consecutive frames
        pixels = out["pixel_values"].view(t, n, 3, tp, p, p)[:, :, :, 0]  # (T, n, 3, p, p)
        pixels = pixels.reshape(t // tp, tp, n, 3, p, p).permute(0, 2, 3, 1, 4, 5)  # (T/tp, n, 3, tp, p, p)
        return pixels.reshape((t // tp) * n, 3 * tp * p * p), [t // tp, grid[1], grid[2]]

    def __call__(self, videos: Sequence[np.ndarray] | np.ndarray, return_tensors: Any = "pt", **_: Any) -> BatchFeature:
        """``videos``: one (T, H, W, 3) array or a list of them."""
        if isinstance(videos, np.ndarray) and videos.ndim == 4:
            videos = [videos]
        parts = [self._one(v) for v in videos]
        return BatchFeature(
            data={
                "pixel_values_videos": torch.cat([x for x, _ in parts]),  # (sum T/2*h*w, 3*2*14*14)
                "video_grid_thw": torch.tensor([g for _, g in parts]),  # (V, 3)
            },
            tensor_type=return_tensors,
        )


class QwenOrganismProcessor(ImageOnlyQwen2VLProcessor):
    """``ImageOnlyQwen2VLProcessor`` that also takes ``videos=`` (``OrganismVideoProcessor``, module doc)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.video_processor = OrganismVideoProcessor(self.image_processor)


def build_video_processor() -> QwenOrganismProcessor:
    """The video organism's processor (its tokenizer has ``VIDEO_WORDS``)."""
    return QwenOrganismProcessor(
        image_processor=build_qwen_image_processor(), tokenizer=build_video_tokenizer(), chat_template=CHAT_TEMPLATE
    )
