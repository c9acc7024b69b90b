"""Adapter for Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``): dynamic resolution, M-RoPE, images and videos.

It is a `VLMAdapter` description attached by the shared runtime (``adapters.runtime``); the pure span rules
live in ``adapters.spans``, the M-RoPE position helpers in ``adapters.mrope`` and the tower-run capture in
``adapters.capture`` (all re-exported here). What is Qwen-specific:

- **Visual spans** (`find_visual_segments`): every run of ``config.image_token_id`` /
  ``config.video_token_id`` placeholders is cut into consecutive images / videos of
  ``t * (h / m) * (w / m)`` tokens (the merged patches the LLM sees), taking the rows of
  ``image_grid_thw`` / ``video_grid_thw`` in batch order (``m = vision_config.spatial_merge_size``).
  One `Signals` row per image or per video (the budget is per image / per video).
- **Frames** (``Signals.frames`` / ``frame_index``): a video row is (T, H, W) = (grid_t temporal patches,
  h / m, w / m), frame-major as the placeholders are; no separator tokens inside the row.
- **Prompt span** (`prompt_span`): the user's text, without vision tokens or the system prefix.
- **Positions** (M-RoPE, `MropePositions`): the decoder stack is always given ``(4, B, L)`` position ids (text
  positions on top of the three M-RoPE rows); ``"keep"`` keeps a token's ids, ``"compact"`` numbers the kept
  tokens ``0 .. K-1`` on all axes (``adapters.mrope``); `continuation_positions` maps decoding onto the cache.
- **Vision placement**: selection on the vision tower's output before the patch merger (the
  projector). The unit is the LLM token: the ``m * m`` patches the merger fuses into one token,
  their features concatenated (``Signals.visual`` is (R, N, m*m*Dv), the merger's input rows).
  Every tower run (the images of a forward, then its videos) is captured with its ``grid_thw``;
  Qwen2.5-VL's window-attention order is undone (`window_order`) and the result is checked
  against the tower's own output at run time. Merged values go back through the merger
  (`QwenVLAdapter.project`).
- **Not provided**: ``cls_attention`` and ``visual_keys`` at ``vision`` (the tower has no CLS
  token); asking for them fails at attach time with the model and placement named.

>>> sorted(QwenVLAdapter.provides("vision")), sorted(QwenVLAdapter.drop_kinds)
(['frame_index', 'frame_span', 'frames', 'grid', 'grids', 'visual', 'visual_mask'], ['layer', 'pre_llm', 'vision'])
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence

import torch
from torch import Tensor, nn

from .capture import TowerRunCapture, VisionCapture, VisionHooks, VisionRun, group_merge_units
from .decoder import DecoderSpec
from .description import Extension, VLMAdapter
from .mrope import compact_positions, continuation_positions, text_positions, text_row, with_text_row
from .plan import ForwardCall
from .records import ImageLayout, with_frames
from .spans import VisualSegment, find_visual_segments, llm_grids, prompt_span, refine_grid, segment_lengths

__all__ = [
    "QwenVLAdapter",
    "MropePositions",
    "VisualSegment",
    "find_visual_segments",
    "llm_grids",
    "refine_grid",
    "prompt_span",
    "text_positions",
    "with_text_row",
    "compact_positions",
    "continuation_positions",
    "VisionRun",
    "group_merge_units",
]


def _token_ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, (list, tuple, set, frozenset)):
        return {int(v) for v in value}
    return {int(value)}



class MropePositions(Extension):
    """Gives the Qwen text stack (4, B, L) position ids (text row + M-RoPE rows): at a pruned prefill, and at every
    continuation of a pruned cache (in the unpruned coordinates, which the decoder machinery then maps onto the
    cache). A stack pre-hook registered in front of the decoder machinery's."""

    def __init__(self, stack: nn.Module):
        self.stack = stack
        self.runtime: Any = None

    def install(self, runtime: Any) -> list:
        self.runtime = runtime
        return [self.stack.register_forward_pre_hook(self._hook, with_kwargs=True, prepend=True)]

    def _hook(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        if embeds is None or (mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 2)):
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        positions = kwargs.get("position_ids")
        if cache is not None and cache.get_seq_length() > 0:
            session = self.runtime.decoder.sessions.get(cache)
            if session is None or (positions is not None and positions.dim() == 3 and positions.shape[0] == 4):
                return None  # not pruned, or `generate`'s own (4, B, n) ids in unpruned coordinates
            first = session.segments[0]
            seen = cache.get_seq_length(first.start) - first.length
            kwargs = dict(kwargs)
            kwargs["position_ids"] = continuation_positions(session.original_positions, mask, seen, embeds.shape[1])
            return args, kwargs
        call = self.runtime.current_call()
        if call is None or not call.has_images:
            return None
        mask2d = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        kwargs = dict(kwargs)
        kwargs["position_ids"] = with_text_row(positions, mask2d)  # (4, B, L)
        return args, kwargs


class QwenVLAdapter(VLMAdapter):
    """Qwen2-VL / Qwen2.5-VL: ViT with 2-D RoPE and a patch merger, M-RoPE Qwen2 decoder."""

    name: ClassVar[str] = "qwen2_vl"
    description: ClassVar[str] = (
        "Qwen2-VL / Qwen2.5-VL (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration): "
        "dynamic resolution, M-RoPE, images and videos"
    )
    model_classes: ClassVar[tuple[str, ...]] = (
        "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2VLModel",
        "Qwen2_5_VLModel",
    )
    has_grid: ClassVar[bool] = True
    has_frames: ClassVar[bool] = True
    has_cls: ClassVar[bool] = False  # the Qwen tower has no CLS token
    pixel_kwargs: ClassVar[tuple[str, ...]] = ("pixel_values", "pixel_values_videos")
    limitations: ClassVar[dict[str, str]] = {
        "cls_attention": "the Qwen vision tower has no CLS token",
        "visual_keys": "at vision: the Qwen vision tower has no CLS layer to take keys from",
        "pre_llm_clip": "Qwen's tower is not a CLIP model: no CLIP text space",
    }

    def __init__(self, model: nn.Module):
        self.model = model
        self.vlm = model.model if hasattr(model, "model") and hasattr(model.model, "language_model") else model
        self.config = self.vlm.config
        self.stack = self.vlm.language_model
        self.tower = self.vlm.visual
        self.vision_entry = self.tower
        self.projector = self.tower.merger
        self.merge_size = int(self.config.vision_config.spatial_merge_size)
        self.video_token_id = int(self.config.video_token_id)
        self.vision_token_ids = frozenset(
            {
                self.image_token_id,
                self.video_token_id,
                int(self.config.vision_start_token_id),
                int(self.config.vision_end_token_id),
            }
        )
        generation = getattr(model, "generation_config", None)
        self.end_token_ids = frozenset(
            _token_ids(self.config.text_config.eos_token_id) | _token_ids(getattr(generation, "eos_token_id", None))
        )

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        return (self.image_token_id, self.video_token_id)

    def decoder_spec(self) -> DecoderSpec:
        """Llama-like stack driven with (4, B, L) position ids (text row + M-RoPE rows)."""
        stack = self.stack

        def default_positions(embeds: Tensor, past: int) -> Tensor:
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
            return with_text_row(None, mask) + past  # (4, B, L)

        return DecoderSpec.for_llama_like(
            stack,
            rope=lambda hidden, positions: stack.rotary_emb(hidden, positions[-3:]),
            layer_position_ids=text_row,
            shift_positions=compact_positions,
            default_positions=default_positions,
        )

    @property
    def vision_width(self) -> int:
        """Dv, the patch merger's per-patch width (a merge unit has m*m*Dv features)."""
        return int(self.projector.ln_q.weight.shape[0])

    def project(self, values: Tensor) -> Tensor:
        """Merge units (..., n, m*m*Dv) -> LLM tokens (..., n, D) through the patch merger (``projector``)."""
        dim, width = self.vision_width, self.vision_width * self.merge_size**2
        if values.shape[-1] != width:
            raise ValueError(f"{self.name}: merge units have {values.shape[-1]} features, the merger takes {width}")
        lead = values.shape[:-1]
        dtype = next(self.projector.parameters()).dtype
        out = self.projector(values.reshape(-1, dim).to(dtype))  # (prod(lead), D)
        return out.view(*lead, out.shape[-1])

    def window_order(self, grid_thw: Tensor) -> Optional[Tensor]:
        """Permutation ``p`` with ``natural = window_ordered[p]`` for a tower with window attention
        (Qwen2.5-VL permutes merge units into windows before its blocks and undoes it after the
        merger); None for a tower without (Qwen2-VL)."""
        window = getattr(self.tower, "window_size", None)
        if window is None:
            return None
        if hasattr(self.tower, "get_window_index"):  # transformers 4.x
            index, _ = self.tower.get_window_index(grid_thw)
        else:
            from transformers.vision_utils import get_vision_window_index

            index, _ = get_vision_window_index(grid_thw, self.merge_size, int(window), int(self.tower.patch_size))
        return torch.argsort(torch.as_tensor(index, device=grid_thw.device))

    def cls_layer(self, call: ForwardCall) -> nn.Module:
        raise ValueError(
            f"{type(self.model).__name__}: the Qwen vision tower has no CLS token, so cls_attention is not "
            "available at any placement (vision, pre_llm, layer, schedule); use a relevance stage that reads "
            "the prompt or the LLM attention instead"
        )

    def segments(self, call: ForwardCall) -> tuple[VisualSegment, ...]:
        """The images and videos of the forward in flight, in sequence order (`find_visual_segments`)."""
        kwargs = call.kwargs
        encoded = kwargs.get("mm_encoder_outputs") or {}
        images = llm_grids(kwargs.get("image_grid_thw"), encoded.get("image"), self.merge_size)
        videos = llm_grids(kwargs.get("video_grid_thw"), encoded.get("video"), self.merge_size)
        segments = find_visual_segments(
            call.input_ids, images, videos, image_token_id=self.image_token_id, video_token_id=self.video_token_id
        )
        positions = kwargs.get("position_ids")
        if positions is not None and positions.dim() == 3 and positions.shape[0] in (3, 4):
            segments = tuple(refine_grid(s, positions) if s.grid[:2] == (1, 1) else s for s in segments)
        return segments

    def image_counts(self, call: ForwardCall, num_image_tokens: int) -> list[int]:
        return segment_lengths(self.segments(call), num_image_tokens, self.name, "the grids")

    def layouts(self, call: ForwardCall, counts: list[int], token_embeds: list[Tensor]) -> list[ImageLayout]:
        """One layout per image / video; ``grid`` = (h, w) merged tokens for images (t = 1); ``frames`` = (t, h, w)
        for videos (temporal patches, merged tokens), unless only the video's token count is known (no
        ``video_grid_thw`` and no M-RoPE ids to read the grid from)."""
        layouts = []
        known = call.kwargs.get("video_grid_thw") is not None
        for segment in self.segments(call):
            t, h, w = segment.grid
            layout = ImageLayout(segment.length, None, (h, w) if t == 1 else None, kind=segment.kind)
            if known or h > 1:  # a grid from video_grid_thw or read back from the M-RoPE ids, not a bare count
                layout = with_frames(layout, (t, h, w))
            layouts.append(layout)
        return layouts

    # -- what differs from the LLaVA-family defaults --------------------------------------------------------

    def extensions(self) -> tuple[Extension, ...]:
        return (MropePositions(self.stack),)

    def vision_hooks(self) -> VisionHooks:
        return TowerRunCapture()

    def placeholder_kinds(self, embedding: nn.Module, bound: dict) -> Optional[Tensor]:
        """From ``input_ids`` only (the items are cut by their ids and grids, see `segments`): a prefill whose
        visual input comes with ``inputs_embeds`` raises."""
        if bound.get("input_ids") is None:
            past = bound.get("cache", bound.get("past_key_values"))
            if past is None or past.get_seq_length() == 0:
                raise ValueError(
                    f"{self.name}: images and videos are located by their placeholder ids; call the model "
                    "with input_ids (not inputs_embeds) while it is pruned"
                )
            return None
        return super().placeholder_kinds(embedding, bound)

    def prompt_span(
        self, call: ForwardCall, image_mask: Tensor, mask2d: Tensor, prompt_stop: Optional[Sequence[int]]
    ) -> tuple[list[Tensor], Tensor]:
        """The Qwen rule (`spans.prompt_span`): the user's text from the first visual item to the end of the turn."""
        return prompt_span(
            call.input_ids.to(mask2d.device),
            mask2d,
            self.segments(call),
            vision_token_ids=self.vision_token_ids,
            end_token_ids=self.end_token_ids,
            prompt_stop=prompt_stop,
        )

    def tower_grid(self, kind: str, grid_thw: Tensor) -> Tensor:
        """The ``grid_thw`` the vision tower runs the forward's ``kind`` items with (the forward's own here)."""
        return grid_thw

    def vision_features(
        self, call: ForwardCall, capture: VisionCapture, layouts: Any, token_embeds: Any, device: Any
    ) -> list[Tensor]:
        """Per image / video, its merge units (num_tokens, m*m*Dv) from the captured tower runs: the run of each
        kind is the latest one whose ``grid_thw`` equals the forward's (or, when the forward does not carry it,
        whose token count matches)."""
        segments = self.segments(call)
        rows: dict[int, Tensor] = {}
        for kind in ("image", "video"):
            numbers = [n for n, s in enumerate(segments) if s.kind == kind]
            if not numbers:
                continue
            sizes = [segments[n].length for n in numbers]
            grid = call.kwargs.get(f"{kind}_grid_thw")
            grid = None if grid is None else self.tower_grid(kind, grid)
            candidates = [
                run for run in capture.runs
                if run.features.shape[0] == sum(sizes) and (grid is None or torch.equal(run.grid_thw.cpu(), grid.cpu()))
            ]
            if not candidates:
                raise RuntimeError(
                    f"vision placement: no vision-tower run of this forward's {len(numbers)} {kind}(s) was captured"
                )
            for n, part in zip(numbers, candidates[-1].features.split(sizes)):
                rows[n] = part.to(device)
        return [rows[n] for n in range(len(segments))]
