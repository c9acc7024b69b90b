"""Adapter for Video-LLaVA (``VideoLlavaForConditionalGeneration``; also ``VideoLlavaModel``).

Video-LLaVA has two CLIP towers of the same shape, ``image_tower`` and ``video_tower``, one MLP projector and a
Llama-like decoder. An image gives the LLM its patch tokens (the CLS token removed under
``vision_feature_select_strategy="default"``); a video gives every frame's tokens *with* the frame's CLS token
(``get_video_features`` applies no strategy), frame after frame. The projector maps each tower token to one LLM
token, so every visual LLM token has exactly one vision-tower feature.

- **Rows.** Placeholders ``config.image_token_id`` and ``config.video_token_id``; one `Signals` row per image and
  per video, in sequence order, the budget per row. Images are cut by their fixed token count (from the tower
  config); a video is one contiguous run of video placeholders (``generate`` pre-encodes the frames without
  saying how many videos they form, so two videos with no text between them are one row, in ``forward`` and in
  ``generate`` alike). Images are row-major patch grids (``Signals.grid`` / ``grids``); videos have no grid.
- **Frames** (``Signals.frames`` / ``frame_index``): a video row is (T, side, side) patch tokens; each frame's
  CLS token (first of its ``side**2 + 1`` tokens) has ``frame_index`` -1 (a row may hold several videos written
  with no text between them: T counts all their frames).
- **No marker tokens**: every placeholder is a tower feature (a video frame's CLS token included).
- **vision**: ``Signals.visual`` is the projector input of each token, captured from both towers' runs
  (`TwoTowerCapture`); merged values go through the projector.
- **Not provided**: ``cls_attention`` (video frames' CLS tokens are themselves LLM tokens; not implemented) and
  CLIP-space signals.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

import torch
from torch import Tensor, nn

from .capture import CaptureNeeds, VisionCapture
from .description import VLMAdapter
from .plan import ForwardCall
from .records import ImageLayout, with_frames
from .spans import VisualSegment, consecutive_runs

__all__ = ["VideoLlavaAdapter", "TwoTowerCapture"]


class TwoTowerCapture:
    """Vision capture of a model with one tower per modality and a shared projector: the projector input of the
    last run of each tower (``VisionCapture.runs``: ``[(kind, (items, n, Dv))]``)."""

    def __init__(self, towers: dict[str, nn.Module]) -> None:
        self._towers = towers
        self._kind: Optional[str] = None
        self._seen: dict[str, Tensor] = {}
        self._projecting: Callable[[], bool] = lambda: False

    def install(self, adapter: Any, needs: CaptureNeeds, projecting: Callable[[], bool]) -> list:
        self._projecting = projecting
        handles = [tower.register_forward_pre_hook(self._enter(kind)) for kind, tower in self._towers.items()]
        handles.append(adapter.projector.register_forward_pre_hook(self._projector_pre))
        return handles

    def take(self) -> VisionCapture:
        seen, self._seen = self._seen, {}
        return VisionCapture(runs=list(seen.items()))

    def _enter(self, kind: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self._kind = kind

        return hook

    def _projector_pre(self, module: nn.Module, args: Any) -> None:
        if self._kind is not None and not self._projecting():
            self._seen[self._kind] = args[0].detach()  # (items, n, Dv)
            self._kind = None
        return None


class VideoLlavaAdapter(VLMAdapter):
    """Video-LLaVA: separate CLIP image and video towers + MLP projector + decoder; one row per image / video."""

    name: ClassVar[str] = "video_llava"
    description: ClassVar[str] = (
        "Video-LLaVA (VideoLlavaForConditionalGeneration): separate image and video towers, one row per image and "
        "per video"
    )
    model_classes: ClassVar[tuple[str, ...]] = ("VideoLlavaForConditionalGeneration", "VideoLlavaModel")
    has_grid: ClassVar[bool] = True
    has_frames: ClassVar[bool] = True
    has_cls: ClassVar[bool] = False
    options: ClassVar[frozenset[str]] = frozenset()
    pixel_kwargs: ClassVar[tuple[str, ...]] = ("pixel_values", "pixel_values_videos")
    limitations: ClassVar[dict[str, str]] = {
        "cls_attention": "video frames' CLS tokens are LLM tokens themselves; CLS attention rows are not implemented",
        "pre_llm_clip": "CLIP-space signals are not implemented for Video-LLaVA",
    }

    #: ``vision_layers``: ToMe inside the CLIP *image* tower, as for LLaVA-1.5 (``adapters/tower_merge.py``); a forward
    #: with videos raises (the video tower is not merged).
    drop_kinds: ClassVar[frozenset[str]] = VLMAdapter.drop_kinds | {"vision_layers"}

    def __init__(self, model: nn.Module):
        self.model = model
        self.vlm = model.model if hasattr(model, "model") and hasattr(model.model, "language_model") else model
        self.config = self.vlm.config
        self.stack = self.vlm.language_model
        self.vision_entry = self.vlm.image_tower
        self.tower = getattr(self.vision_entry, "vision_model", self.vision_entry)
        self.projector = self.vlm.multi_modal_projector
        self.video_token_id = int(self.config.video_token_id)

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        return (self.image_token_id, self.video_token_id)

    def cls_layer(self, call: ForwardCall) -> nn.Module:
        raise ValueError(f"{type(self.model).__name__}: {self.limitations['cls_attention']}")

    def vision_hooks(self) -> TwoTowerCapture:
        return TwoTowerCapture({"image": self.vlm.image_tower, "video": self.vlm.video_tower})

    def _image_tokens(self, call: ForwardCall) -> int:
        """LLM tokens of one image: the tower's patches, plus CLS under the ``full`` strategy."""
        return self.patch_side() ** 2 + (0 if self.strategy(call) == "default" else 1)

    def segments(self, call: ForwardCall) -> tuple[VisualSegment, ...]:
        """The images and videos of the forward in flight, in sequence order (cached on the call)."""
        if "segments" in call.memo:
            return call.memo["segments"]
        kinds = call.kind_ids
        if kinds is None:
            raise ValueError(f"{self.name}: the placeholders of this forward could not be located")
        per_image, per_frame = self._image_tokens(call), self.patch_side() ** 2 + 1
        segments = []
        for sample in range(kinds.shape[0]):
            for token, kind in ((self.image_token_id, "image"), (self.video_token_id, "video")):
                positions = (kinds[sample] == token).nonzero().flatten().tolist()
                for start, length in consecutive_runs(positions):
                    size = per_image if kind == "image" else per_frame
                    if length % size:
                        raise ValueError(
                            f"{self.name}: a run of {length} {kind} placeholders in row {sample} is not a whole "
                            f"number of {kind}s ({'frames of ' if kind == 'video' else ''}{size} tokens)"
                        )
                    items = [(1, 1, size)] * (length // size) if kind == "image" else [(1, 1, length)]
                    for offset, grid in enumerate(items):
                        segments.append(VisualSegment(sample, kind, start + offset * size, grid))
        call.memo["segments"] = tuple(sorted(segments, key=lambda s: (s.sample, s.start)))
        return call.memo["segments"]

    def image_counts(self, call: ForwardCall, num_image_tokens: int) -> list[int]:
        return [segment.length for segment in self.segments(call)]

    def layouts(self, call: ForwardCall, counts: list[int], token_embeds: list[Tensor]) -> list[ImageLayout]:
        side = self.patch_side()
        grid = (side, side) if self.strategy(call) == "default" else None
        per_frame = side * side + 1  # the frame's CLS token, then its patches
        layouts = []
        for s in self.segments(call):
            layout = ImageLayout(s.length, None, grid if s.kind == "image" else None, kind=s.kind)
            if s.kind == "video":
                cls_tokens = torch.arange(s.length) % per_frame == 0  # (n,) each frame's CLS token
                layout = with_frames(layout, (s.length // per_frame, side, side), cls_tokens)
            layouts.append(layout)
        return layouts

    def vision_features(self, call, capture: VisionCapture, layouts, token_embeds, device) -> list[Tensor]:
        """Per image / video, the projector input of each of its LLM tokens (tower runs in batch order)."""
        runs = {kind: features.reshape(-1, features.shape[-1]) for kind, features in capture.runs}  # (tokens, Dv)
        offsets = {kind: 0 for kind in runs}
        rows = []
        for layout in layouts:
            if layout.kind not in runs:
                raise RuntimeError(f"vision placement: the {layout.kind} tower did not run for this forward")
            start = offsets[layout.kind]
            rows.append(runs[layout.kind][start : start + layout.num_tokens])
            offsets[layout.kind] = start + layout.num_tokens
        for kind, used in offsets.items():
            if used != runs[kind].shape[0]:
                raise RuntimeError(f"{self.name}: {runs[kind].shape[0]} {kind} features for {used} placeholders")
        return rows
