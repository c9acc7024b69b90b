"""Adapter for LLaVA-1.5 (``LlavaForConditionalGeneration``; also its base ``LlavaModel``).

Image spans: every ``config.image_token_id`` placeholder in ``input_ids`` is an image token; the
placeholders are cut, in row-major order, into consecutive images of ``total / num_images`` tokens
(``num_images`` = ``pixel_values.shape[0]``), so several images per prompt and adjacent images work.
Each image's tokens are a row-major patch grid (``Signals.grid``) when the CLS token is removed
(``vision_feature_select_strategy="default"``, the LLaVA-1.5 setting).

Prompt span: :func:`vtprune.adapters.spans.prompt_positions` (text after the last image token up to the end
of the input, or up to ``prompt_stop``; for the LLaVA-1.5 template ``"USER: <image>\\n{question}
ASSISTANT:"`` pass the ids of ``" ASSISTANT:"`` as ``prompt_stop`` to exclude the assistant marker).

``pre_llm_clip`` (CDPruner): the ``pre_llm`` drop plus ``clip_visual`` / ``clip_text`` / ``clip_text_mask`` computed
with the CLIP checkpoint of the vision tower (``framework.prune(..., clip_model=..., tokenizer=...)``, see
``vtprune.adapters.clip_signals``). VisionZip ``keep_cls=True`` at ``vision``: the image's CLS token is given to
the LLM in front of the kept patches (see ``apply_with_cls`` in ``decisions.py`` and docs/adapters.md).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from vtprune.framework.support import CLIP_SIGNALS

from .description import VLMAdapter, without_videos
from .plan import ForwardCall
from .records import ImageLayout

__all__ = ["LlavaAdapter"]


class LlavaAdapter(VLMAdapter):
    """LLaVA-1.5: CLIP vision tower + MLP projector + Llama-family decoder."""

    name: ClassVar[str] = "llava"
    description: ClassVar[str] = "LLaVA-1.5 (LlavaForConditionalGeneration): CLIP ViT + MLP projector + decoder"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaForConditionalGeneration", "LlavaModel")
    has_grid: ClassVar[bool] = True
    on_request: ClassVar[dict[str, frozenset[str]]] = {"pre_llm": CLIP_SIGNALS}  # CDPruner's, for pre_llm_clip
    supports_keep_cls: ClassVar[bool] = True
    limitations: ClassVar[dict[str, str]] = without_videos("LLaVA-1.5 takes images only: no video rows, so no frame structure")
    #: ``vision_layers``: ToMe inside the CLIP tower (``adapters/tower_merge.py``).
    drop_kinds: ClassVar[frozenset[str]] = VLMAdapter.drop_kinds | {"vision_layers"}

    def image_counts(self, call: ForwardCall, num_image_tokens: int) -> list[int]:
        encoded = (call.kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:  # generate() encodes the images before the forward
            return [int(f.shape[0]) for f in encoded.pooler_output]
        num_images = int(call.kwargs["pixel_values"].shape[0])
        if num_images == 0 or num_image_tokens % num_images:
            raise ValueError(f"llava: {num_image_tokens} image tokens cannot be split into {num_images} images")
        return [num_image_tokens // num_images] * num_images

    def layouts(self, call: ForwardCall, counts: list[int], token_embeds: list[Tensor]) -> list[ImageLayout]:
        side = self.patch_side()
        return [ImageLayout(c, None, (side, side) if c == side * side else None) for c in counts]

    def vision_rows(self, capture, layouts, token_embeds, per_crop: Tensor) -> list[Tensor]:
        if per_crop.shape[0] != len(layouts):
            raise ValueError(f"llava: {per_crop.shape[0]} encoded images for {len(layouts)} images in the input")
        return list(per_crop.unbind(0))
