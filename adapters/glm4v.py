"""Adapter for GLM-4.1V (``Glm4vForConditionalGeneration``, ``Glm4vModel``): dynamic resolution, M-RoPE-style 3-D
positions, images and videos.

GLM-4.1V is built like Qwen2-VL (``adapters.qwen2_vl``): the text model takes ``(3, B, L)`` M-RoPE ids (or ``(4, B,
L)`` with a text row, what ``generate`` gives), and its rotary module composes the three axes itself, so the
Qwen2-VL decoder description applies (``(4, B, L)`` stack positions through `MropePositions`, ``keep`` / ``compact``,
rope deltas when decoding; GLM's own ``apply_rotary_pos_emb`` with its partial, interleaved rotation). What
differs:

- **Placeholders**: images *and* video frames are written with ``config.image_token_id``; a frame is
  ``<|begin_of_image|>`` + placeholders + ``<|end_of_image|>`` + its timestamp (text), and a video's frames sit
  between ``<|begin_of_video|>`` and ``<|end_of_video|>``. A placeholder is a video token when more video starts
  than video ends precede it (the processor's own rule for ``mm_token_type_ids``). Items are cut as Qwen3-VL's
  (`find_visual_items`): one `Signals` row per image and per video (all its frames). The begin / end markers and the
  timestamps are never prunable.
- **Prompt span**: the Qwen rule (text from the first visual item to the end of the turn, without vision markers),
  minus everything inside a video (the frame timestamps).
- **Vision placement**: the tower merges ``m x m`` patches with a strided convolution *before* its patch merger, so
  the merger's input has one row per LLM token: ``Signals.visual`` is that row ((R, N, Dv), ``Dv =
  vision_config.out_hidden_size``) and merged values go back through the merger (`project`). Video frames run
  through the tower as single-frame grids; they are matched with the forward's ``video_grid_thw`` frame by frame.
- **Not provided**: ``cls_attention`` / ``visual_keys`` at ``vision`` (no CLS token), CLIP-space signals.

A forward with both images and videos is rejected by the model itself (it counts video frames as image
placeholders), so each forward carries images or videos.

>>> sorted(Glm4vAdapter.placements)
['layer', 'pre_llm', 'schedule', 'sparse_layers', 'vision']
"""

from __future__ import annotations

from typing import ClassVar, Optional, Sequence

import torch
from torch import Tensor, nn

from .capture import TowerRunCapture, VisionHooks
from .description import VLMAdapter
from .plan import ForwardCall
from .qwen2_vl import QwenVLAdapter, _token_ids
from .qwen3_vl import VisualItem, cut_items
from .spans import prompt_span

__all__ = ["Glm4vAdapter", "video_token_mask"]

#: Stand-in id of video placeholders while items are cut (GLM writes them with the image token id).
_VIDEO_KIND = -2


def video_token_mask(input_ids: Tensor, start_id: int, end_id: int) -> Tensor:
    """(B, L) bool: True inside a video, i.e. where more ``start_id`` than ``end_id`` tokens precede (inclusive).

    >>> video_token_mask(torch.tensor([[5, 7, 9, 3, 9, 8, 9]]), 7, 8).long().tolist()  # 7 = video start, 8 = end
    [[0, 1, 1, 1, 1, 0, 0]]
    """
    return (input_ids == start_id).long().cumsum(1) > (input_ids == end_id).long().cumsum(1)


class Glm4vAdapter(QwenVLAdapter):
    """GLM-4.1V: ViT with 2-D RoPE and a conv downsampler before the patch merger; GLM-4 decoder with M-RoPE."""

    name: ClassVar[str] = "glm4v"
    description: ClassVar[str] = (
        "GLM-4.1V (Glm4vForConditionalGeneration, Glm4vModel): dynamic resolution, M-RoPE-style 3-D positions, "
        "images and timestamped videos"
    )
    model_classes: ClassVar[tuple[str, ...]] = ("Glm4vForConditionalGeneration", "Glm4vModel")
    limitations: ClassVar[dict[str, str]] = {
        "cls_attention": "the GLM-4.1V vision tower has no CLS token",
        "visual_keys": "at vision: the GLM-4.1V vision tower has no CLS layer to take keys from",
        "pre_llm_clip": "GLM-4.1V's tower is not a CLIP model: no CLIP text space",
    }

    def __init__(self, model: nn.Module):
        self.model = model
        self.vlm = model.model if hasattr(model, "model") and hasattr(model.model, "language_model") else model
        self.config = config = self.vlm.config
        self.stack = self.vlm.language_model
        self.tower = self.vision_entry = self.vlm.visual
        self.projector = self.tower.merger
        self.merge_size = int(config.vision_config.spatial_merge_size)
        self.video_token_id = int(config.video_token_id)
        self.video_start_id, self.video_end_id = int(config.video_start_token_id), int(config.video_end_token_id)
        markers = (config.image_start_token_id, config.image_end_token_id, self.video_start_id, self.video_end_id)
        self.vision_token_ids = frozenset({self.image_token_id, *(int(m) for m in markers)})
        generation = getattr(model, "generation_config", None)
        self.end_token_ids = frozenset(
            _token_ids(config.text_config.eos_token_id) | _token_ids(getattr(generation, "eos_token_id", None))
        )

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        return (self.image_token_id,)  # video frames use the image placeholder too

    @property
    def vision_width(self) -> int:
        """Dv, the width of the merger's input rows (one per LLM token)."""
        return int(self.config.vision_config.out_hidden_size)

    def project(self, values: Tensor) -> Tensor:
        """Downsampled rows (..., n, Dv) -> LLM tokens (..., n, D) through the patch merger."""
        return VLMAdapter.project(self, values)

    def window_order(self, grid_thw: Tensor) -> Optional[Tensor]:
        return None  # no window attention in the GLM-4.1V tower

    def vision_hooks(self) -> VisionHooks:
        return TowerRunCapture(merge_size=1)  # the merger's input rows are already one per LLM token

    def segments(self, call: ForwardCall) -> tuple[VisualItem, ...]:
        """The images and videos of the forward in flight, in sequence order (`qwen3_vl.cut_items` on the ids with
        video placeholders told apart by `video_token_mask`)."""
        if "glm4v_items" not in call.memo:
            ids = call.input_ids
            inside = video_token_mask(ids, self.video_start_id, self.video_end_id)  # (B, L)
            kinds = torch.where((ids == self.image_token_id) & inside, torch.full_like(ids, _VIDEO_KIND), ids)  # (B, L)
            call.memo["glm4v_items"] = cut_items(call, kinds, self.image_token_id, _VIDEO_KIND, self.merge_size)
        return call.memo["glm4v_items"]

    def prompt_span(
        self, call: ForwardCall, image_mask: Tensor, mask2d: Tensor, prompt_stop: Optional[Sequence[int]]
    ) -> tuple[list[Tensor], Tensor]:
        """The Qwen rule without anything inside a video (its frame timestamps)."""
        ids = call.input_ids.to(mask2d.device)
        spans, query = prompt_span(
            ids, mask2d, self.segments(call), vision_token_ids=self.vision_token_ids,
            end_token_ids=self.end_token_ids, prompt_stop=prompt_stop,
        )
        inside = video_token_mask(ids, self.video_start_id, self.video_end_id)  # (B, L)
        out, queries = [], []
        for row, span in enumerate(spans):
            kept = span[~inside[row, span]]
            out.append(kept if kept.numel() else span)
            queries.append(kept[-1] if kept.numel() else query[row])
        return out, torch.stack(queries).long() if queries else query

    def tower_grid(self, kind: str, grid_thw: Tensor) -> Tensor:
        """Video frames run through the tower one by one: each video's (t, h, w) becomes t grids (1, h, w)."""
        if kind != "video":
            return grid_thw
        return torch.cat([torch.ones_like(grid_thw[:, :1]), grid_thw[:, 1:]], 1).repeat_interleave(grid_thw[:, 0], 0)
