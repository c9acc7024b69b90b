"""`CountedVideoItems`: images and videos cut by per-item token counts (LLaVA-NeXT-Video, LLaVA-OneVision).

Families whose images and videos each take one unbroken run of their own placeholder (``config.image_token_id``,
``config.video_token_id``) and whose token count per item is known before the forward (from the model's own
packing / pooling) share the same cutting rule: `spans.find_visual_segments` with ``(1, 1, n)`` grids, images in
``image_sizes`` / ``pixel_values`` order, videos in ``pixel_values_videos`` order; one `Signals` row per item, in
sequence order. A family supplies only its counts (`item_token_counts`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .plan import ForwardCall
from .spans import VisualSegment, find_visual_segments, segment_lengths

__all__ = ["CountedVideoItems"]


class CountedVideoItems:
    """Mixin for a `VLMAdapter` with image and video placeholders cut by per-item token counts.

    Provides ``video_token_id``, ``placeholder_ids`` (image, video), `segments` (cached on the call) and
    `image_counts` (the items' lengths, checked against the forward's visual tokens)."""

    name: str
    config: Any
    image_token_id: int

    @property
    def video_token_id(self) -> int:
        return int(self.config.video_token_id)

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        return (self.image_token_id, self.video_token_id)

    def item_token_counts(self, call: ForwardCall, kinds: Tensor) -> tuple[list[int], list[int]]:
        """(tokens of each image, tokens of each video) of the forward, in batch order; ``kinds`` is the (B, L)
        placeholder id at every visual placeholder, -1 elsewhere."""
        raise NotImplementedError

    def segments(self, call: ForwardCall) -> tuple[VisualSegment, ...]:
        """The images and videos of the forward in flight, in sequence order (cached on the call)."""
        if "segments" not in call.memo:
            kinds = call.kind_ids
            if kinds is None:
                raise ValueError(f"{self.name}: the placeholders of this forward could not be located")
            images, videos = self.item_token_counts(call, kinds)
            call.memo["segments"] = find_visual_segments(
                kinds,
                [(1, 1, n) for n in images],
                [(1, 1, n) for n in videos],
                image_token_id=self.image_token_id,
                video_token_id=self.video_token_id,
            )
        return call.memo["segments"]

    def image_counts(self, call: ForwardCall, num_image_tokens: int) -> list[int]:
        return segment_lengths(self.segments(call), num_image_tokens, self.name, "the images and videos")
