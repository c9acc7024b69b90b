"""Adapter for Mistral 3 / Pixtral (``Mistral3ForConditionalGeneration``; also its base ``Mistral3Model``).

Pixtral encodes each image at its own size: ``h x w`` patches (``patch_size`` pixels each), which the projector's
patch merger fuses in ``m x m`` blocks (``m = config.spatial_merge_size``), so one image is an ``(h/m) x (w/m)``
row-major grid of LLM tokens. The processor writes one ``[IMG]`` placeholder (``config.image_token_id``) per
token and closes every grid row with ``[IMG_BREAK]`` (the last one with ``[IMG_END]``).

- **Visual tokens**: the ``[IMG]`` placeholders only. ``[IMG_BREAK]`` / ``[IMG_END]`` are ordinary text tokens
  of the vocabulary (not image features): never candidates, never dropped; an image's placeholders are cut out
  of the input in row-major order (``(h/m) * (w/m)`` each, from ``image_sizes``, or the lengths of the features
  ``generate`` encoded first), so its tokens need not be contiguous. ``Signals.grid`` / ``grids`` is the merged
  grid of each image (images of different sizes get per-row ``grids``).
- **Vision placement**: the unit is the LLM token, i.e. the ``m * m`` patches the merger fuses: ``Signals.visual``
  is the merger's input row of the token (``(R, N, m*m*Dv)``, the normed patch features the patch merger
  gathered, captured by a pre-hook on ``patch_merger.merging_layer``); merged values go back through
  ``merging_layer`` and the projector's MLP (`Mistral3Adapter.project`). No CLS token: no ``cls_attention`` and
  no ``visual_keys`` at ``vision``.
- **Decoder**: the Mistral / Llama-like text stack (1-D RoPE): the shared runtime as is.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

import torch
from torch import Tensor

from .capture import CaptureNeeds, VisionCapture, VisionHooks
from .description import VLMAdapter, without_videos
from .plan import ForwardCall
from .records import ImageLayout

__all__ = ["Mistral3Adapter", "MergerCapture"]


class MergerCapture:
    """Records, for every vision-tower run, the input rows of the patch merger's ``merging_layer``: one row per LLM
    token (its ``m * m`` patches' features), the images of the run one after another."""

    def __init__(self) -> None:
        self._rows: Optional[Tensor] = None
        self._open = False
        self._projecting: Callable[[], bool] = lambda: False

    def install(self, adapter: Any, needs: CaptureNeeds, projecting: Callable[[], bool]) -> list:
        self._projecting = projecting
        return [
            adapter.vision_entry.register_forward_pre_hook(self._tower_pre),
            adapter.merging_layer.register_forward_pre_hook(self._merger_pre),
        ]

    def take(self) -> VisionCapture:
        rows, self._rows = self._rows, None
        return VisionCapture(features=rows)

    def _tower_pre(self, module, args):
        self._open = not self._projecting()
        return None

    def _merger_pre(self, module, args):
        if self._open and not self._projecting() and args:
            self._rows = args[0].detach()  # (tokens, m*m*Dv)
            self._open = False
        return None


class Mistral3Adapter(VLMAdapter):
    """Mistral 3 / Pixtral: Pixtral vision tower at native resolution, patch merger + MLP projector, Mistral decoder."""

    name: ClassVar[str] = "mistral3"
    description: ClassVar[str] = (
        "Mistral 3 / Pixtral (Mistral3ForConditionalGeneration): variable image size, [IMG_BREAK]/[IMG_END] rows"
    )
    model_classes: ClassVar[tuple[str, ...]] = ("Mistral3ForConditionalGeneration", "Mistral3Model")
    has_grid: ClassVar[bool] = True
    has_cls: ClassVar[bool] = False
    options: ClassVar[frozenset[str]] = frozenset()
    limitations: ClassVar[dict[str, str]] = {
        "cls_attention": "the Pixtral vision tower has no CLS token",
        "pre_llm_clip": "CLIP-space signals are not implemented for Pixtral (no CLIP tower)",
        **without_videos(
            "Mistral 3 / Pixtral takes images only: no video rows, so no frame structure"
        ),
    }

    def __init__(self, model: Any):
        super().__init__(model)
        self.tower = self.vision_entry
        self.merging_layer = self.projector.patch_merger.merging_layer

    @property
    def merge_size(self) -> int:
        return int(self.config.spatial_merge_size)

    # -- images -----------------------------------------------------------------------------------------

    def _grids(self, call: ForwardCall) -> Optional[list[tuple[int, int]]]:
        sizes = call.kwargs.get("image_sizes")
        if sizes is None:
            return None
        step = int(self.config.vision_config.patch_size) * self.merge_size
        return [(int(h) // step, int(w) // step) for h, w in torch.as_tensor(sizes).tolist()]

    def image_counts(self, call: ForwardCall, num_image_tokens: int) -> list[int]:
        encoded = (call.kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:  # generate() encodes the images before the forward
            return [int(f.shape[0]) for f in encoded.pooler_output]
        grids = self._grids(call)
        if grids is None:
            raise ValueError("mistral3: image_sizes is required to locate the image tokens")
        return [h * w for h, w in grids]

    def layouts(self, call: ForwardCall, counts: list[int], token_embeds: list[Tensor]) -> list[ImageLayout]:
        grids = self._grids(call) or [None] * len(counts)
        return [ImageLayout(c, None, g if g is not None and g[0] * g[1] == c else None) for c, g in zip(counts, grids)]

    # -- vision side --------------------------------------------------------------------------------------

    def vision_hooks(self) -> VisionHooks:
        return MergerCapture()

    def capture_needs(self, requires: frozenset, vision_drop: bool, keep_cls: bool) -> CaptureNeeds:
        return CaptureNeeds()

    def cls_layer(self, call: ForwardCall):
        raise ValueError("mistral3: the Pixtral vision tower has no CLS token: cls_attention is not available")

    def project(self, values: Tensor) -> Tensor:
        """Merger input rows (..., n, m*m*Dv) -> LLM tokens (..., n, D): ``merging_layer`` then the MLP."""
        projector = self.projector
        dtype = self.merging_layer.weight.dtype
        hidden = projector.linear_1(self.merging_layer(values.to(dtype)))
        return projector.linear_2(projector.act(hidden))

    def vision_features(
        self, call: ForwardCall, capture: VisionCapture, layouts: list[ImageLayout], token_embeds: list[Tensor], device: Any
    ) -> list[Tensor]:
        """Per image, its merger input rows (num_tokens, m*m*Dv), the run's rows split by the images' token counts."""
        rows = capture.features
        counts = [layout.num_tokens for layout in layouts]
        if rows is None:
            raise RuntimeError("vision placement: the vision tower did not run for this forward")
        if rows.shape[0] != sum(counts):
            raise RuntimeError(f"mistral3: the tower run has {rows.shape[0]} merged tokens, the images {sum(counts)}")
        return [r.to(device) for r in torch.split(rows, counts)]
