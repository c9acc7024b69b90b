"""Adapter for InternVL 2.5 / 3 (``InternVLForConditionalGeneration``; also ``InternVLModel``).

InternVL cuts an image into tiles (dynamic crops plus a thumbnail); every tile runs through the InternViT tower, its
patch grid is pixel-shuffled (``downsample_ratio``, 2x2 patches -> one token) and projected. The processor writes
``<img>`` + one ``<IMG_CONTEXT>`` per token of every tile + ``</img>``: **one `Signals` row per image** = one
unbroken run of ``config.image_token_id`` placeholders (all its tiles, tile after tile). Videos reach the model as
frames written ``Frame{i}: <img>...</img>``: one row per frame. The ``<img>`` / ``</img>`` / ``Frame`` markers are
text tokens, never prunable.

- Token counts come from the runs of placeholders (``adapters.runs``), so tiles per image, images of different
  sizes, several images per prompt and ``generate`` (pre-encoded images) need no count from the processor. Two
  images are two runs only when text (the processor's ``</img><img>``) separates them.
- ``grid``: an image of one tile is its ``s x s`` token grid (``s`` = patches per side x ``downsample_ratio``);
  a multi-tile image has no single grid.
- ``vision``: the projector input, after the pixel shuffle, is one feature per LLM token (``4 * Dv`` wide);
  merged values go through the projector.
- Not provided: ``cls_attention`` (four patches are shuffled into one token; the CLS row of a patch is not the
  row of an LLM token) and CLIP-space signals.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from .description import VLMAdapter, without_videos
from .plan import ForwardCall
from .records import ImageLayout
from .runs import placeholder_runs, split_blocks, square_layouts

__all__ = ["InternVLAdapter"]


def _first(value) -> int:
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


class InternVLAdapter(VLMAdapter):
    """InternVL 2.5 / 3: InternViT tiles + pixel-shuffle MLP projector + Qwen2 / Llama decoder."""

    name: ClassVar[str] = "internvl"
    description: ClassVar[str] = (
        "InternVL 2.5 / 3 (InternVLForConditionalGeneration): tiles with pixel-shuffled tokens; one row per image"
    )
    model_classes: ClassVar[tuple[str, ...]] = ("InternVLForConditionalGeneration", "InternVLModel")
    has_cls: ClassVar[bool] = False
    has_grid: ClassVar[bool] = True
    limitations: ClassVar[dict[str, str]] = {
        "cls_attention": "the pixel shuffle merges 2x2 patches into one LLM token: no CLS row per LLM token",
        "pre_llm_clip": "CLIP-space signals are not implemented for the InternViT tower",
        **without_videos(
            "InternVL's processor writes a video as images (`Frame{i}: <img>...</img>`), indistinguishable "
            "in the model input from several images: every frame is its own image row, no frame structure"
        ),
    }

    def tile_side(self) -> int:
        """Tokens per side of one tile after the pixel shuffle."""
        vision = self.config.vision_config
        patches = _first(vision.image_size) // _first(vision.patch_size)
        return int(patches * float(self.config.downsample_ratio))

    def cls_layer(self, call: ForwardCall) -> nn.Module:
        raise ValueError(f"{type(self.model).__name__}: {self.limitations['cls_attention']}")

    def image_counts(self, call: ForwardCall, num_image_tokens: int) -> list[int]:
        counts = placeholder_runs(call.kind_ids, self.name)
        tile = self.tile_side() ** 2
        if sum(counts) != num_image_tokens or any(count % tile for count in counts):
            raise ValueError(
                f"{self.name}: placeholder runs {counts} are not whole tiles of {tile} tokens "
                f"covering the {num_image_tokens} image tokens"
            )
        return counts

    def layouts(self, call: ForwardCall, counts: list[int], token_embeds: list[Tensor]) -> list[ImageLayout]:
        return square_layouts(counts, self.tile_side())

    def vision_rows(self, capture, layouts, token_embeds, per_crop: Tensor) -> list[Tensor]:
        return split_blocks(per_crop, [layout.num_tokens for layout in layouts], self.name)
