"""Adapter for LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``; also ``LlavaNextVideoModel``).

Images are LLaVA-NeXT's AnyRes images (base view, unpadded crop grid with one ``image_newline`` per row; counts from
the model's own ``pack_image_features``, `LlavaNextAdapter`); videos are frames of the CLIP tower, each pooled by the
model's ``vision_resampler`` (``spatial_pool_stride``) *before* the projector, with no newline token. What differs
from LLaVA-NeXT lives here:

- **Images and videos.** Placeholders ``config.image_token_id`` and ``config.video_token_id``; **one `Signals` row
  per image and per video**, in sequence order (`spans.find_visual_segments`), the budget per row. Per video:
  ``frames x`` the tokens of the model's own ``vision_resampler`` run on ones (``mm_encoder_outputs["video"]``'s
  lengths when ``generate`` pre-encoded it).
- **Frames** (``Signals.frames`` / ``frame_index``): a video row is (T, H, W) = (frames, the resampler's pooled
  square grid), frame-major, no newline.
- **Newlines** (images only) are exact copies of ``model.image_newline`` and ordinary candidates at ``pre_llm`` /
  ``layer``, as for LLaVA-NeXT.
- **Not provided**: ``vision`` (video frames are pooled before the projector, so a video LLM token is not one
  vision-tower token) and ``cls_attention`` (images and videos run the tower separately and pooled video tokens
  have no CLS row).
"""

from __future__ import annotations

import math
from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from .llava_next import LlavaNextAdapter
from .plan import ForwardCall
from .records import ImageLayout, with_frames
from .video_items import CountedVideoItems

__all__ = ["LlavaNextVideoAdapter"]


class LlavaNextVideoAdapter(CountedVideoItems, LlavaNextAdapter):
    """LLaVA-NeXT-Video: AnyRes images with image-newline tokens + pooled video frames; one row per item."""

    name: ClassVar[str] = "llava_next_video"
    description: ClassVar[str] = (
        "LLaVA-NeXT-Video (LlavaNextVideoForConditionalGeneration): AnyRes images with image-newline tokens and "
        "pooled video frames; one row per image and per video"
    )
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaNextVideoForConditionalGeneration", "LlavaNextVideoModel")
    drop_kinds: ClassVar[frozenset[str]] = frozenset({"pre_llm", "layer"})
    has_cls: ClassVar[bool] = False
    has_frames: ClassVar[bool] = True
    pixel_kwargs: ClassVar[tuple[str, ...]] = ("pixel_values", "pixel_values_videos")
    limitations: ClassVar[dict[str, str]] = {
        "vision": "video frames are pooled (vision_resampler) before the projector, so a video LLM token is not one "
        "vision-tower token",
        "cls_attention": "images and videos run the vision tower separately and pooled video tokens have no CLS row",
        "pre_llm_clip": "CLIP-space signals of AnyRes crops and pooled frames are not implemented",
        "vision_layers": "images and video frames run the same CLIP tower, and generate() encodes them before any "
        "forward, so hooks on the tower cannot tell a video run (whose tokens vision_resampler pools on the patch grid, "
        "which merged tokens no longer form) from an image run",
    }

    def cls_layer(self, call: ForwardCall) -> nn.Module:
        raise ValueError(f"{type(self.model).__name__}: {self.limitations['cls_attention']}")

    def _image_token_counts(self, call: ForwardCall) -> list[int]:
        encoded = (call.kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is None and call.kwargs.get("pixel_values") is None:
            return []
        return LlavaNextAdapter.image_counts(self, call, 0)  # LLaVA-NeXT packing (the total is checked by the segments)

    def _video_token_counts(self, call: ForwardCall) -> list[int]:
        encoded = (call.kwargs.get("mm_encoder_outputs") or {}).get("video")
        if encoded is not None:  # (videos, frames x pooled, D)
            return [int(f.shape[0]) for f in encoded.pooler_output]
        videos = call.kwargs.get("pixel_values_videos")
        if videos is None:
            return []
        return [int(videos.shape[1]) * self._pooled_tokens(call)] * int(videos.shape[0])

    def _pooled_tokens(self, call: ForwardCall) -> int:
        """Tokens of one video frame after the model's own ``vision_resampler`` (run on ones)."""
        if "pooled_tokens" not in call.memo:
            side = self.patch_side()
            per_frame = side * side + (0 if self.strategy(call) == "default" else 1)
            resampler = self.vlm.vision_resampler
            weight = next(resampler.parameters(), None)
            dtype = weight.dtype if weight is not None else torch.float32
            with torch.no_grad():
                ones = torch.ones(1, per_frame, int(self.config.vision_config.hidden_size), dtype=dtype)
                call.memo["pooled_tokens"] = int(resampler(ones).shape[1])  # (1, pooled, C)
        return call.memo["pooled_tokens"]

    def _frame_grid(self, call: ForwardCall, count: int) -> Optional[tuple[int, int, int]]:
        """(T, H, W) of a video of ``count`` tokens: frames of the resampler's square pooled grid."""
        pooled = self._pooled_tokens(call)
        side = math.isqrt(pooled)
        if side * side != pooled or count % pooled:
            return None
        return count // pooled, side, side

    def item_token_counts(self, call: ForwardCall, kinds: Tensor) -> tuple[list[int], list[int]]:
        return self._image_token_counts(call), self._video_token_counts(call)

    def layouts(self, call: ForwardCall, counts: list[int], token_embeds: list[Tensor]) -> list[ImageLayout]:
        out = []
        for segment, layout in zip(self.segments(call), super().layouts(call, counts, token_embeds)):
            newline = layout.newline if segment.kind == "image" else None
            views = layout.views if segment.kind == "image" else None  # a video is one view
            item = ImageLayout(layout.num_tokens, newline, None, kind=segment.kind, views=views)
            if segment.kind == "video":
                item = with_frames(item, self._frame_grid(call, layout.num_tokens))
            out.append(item)
        return out
