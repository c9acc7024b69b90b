"""Adapters for Idefics3 (``Idefics3ForConditionalGeneration``) and SmolVLM (``SmolVLMForConditionalGeneration``).

Both split a large image into sub-images (a grid of crops plus a global view) and encode each one as a SigLIP
patch grid, pixel-shuffled by the connector (``scale_factor``) and linearly projected. The processor writes every
sub-image as ``<fake_token_around_image><row_i_col_j>`` (or ``<global-img>``) followed by ``image_seq_len``
``<image>`` placeholders, with ``\\n`` text after each row of crops. **One `Signals` row per sub-image** (a crop or
the global view) = one unbroken run of ``config.image_token_id`` placeholders, in the order of the runs; the
budget applies per sub-image (a tuple budget gives one value per sub-image). The forward does not say which
sub-images form one image, so rows are sub-images. SmolVLM videos reach the model as frames, one sub-image each,
with timestamp text between them: one row per frame.

- Row / column markers, ``<global-img>``, ``<fake_token_around_image>`` and the newlines are text tokens of the
  prompt, never prunable visual tokens (the family's features do not include them).
- ``grid``: every sub-image is its ``s x s`` token grid (``s`` = patches per side / ``scale_factor``).
- ``vision``: the input of ``connector.modality_projection`` (after the pixel shuffle) is one feature per LLM
  token; merged values go through that projection.
- Not provided: ``cls_attention`` (the SigLIP tower has no CLS token) and CLIP-space signals.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from .decoder import DecoderSpec
from .description import VLMAdapter, without_videos
from .plan import ForwardCall
from .records import ImageLayout
from .runs import placeholder_runs, split_blocks, square_layouts

__all__ = ["Idefics3Adapter", "SmolVLMAdapter"]


class Idefics3Adapter(VLMAdapter):
    """Idefics3: SigLIP sub-images + pixel-shuffle connector + Llama decoder (``text_model``)."""

    name: ClassVar[str] = "idefics3"
    description: ClassVar[str] = (
        "Idefics3 (Idefics3ForConditionalGeneration): image splitting into sub-images; one row per sub-image"
    )
    model_classes: ClassVar[tuple[str, ...]] = ("Idefics3ForConditionalGeneration", "Idefics3Model")
    has_cls: ClassVar[bool] = False
    has_grid: ClassVar[bool] = True
    limitations: ClassVar[dict[str, str]] = {
        "cls_attention": "the SigLIP vision tower has no CLS token",
        "pre_llm_clip": "CLIP-space signals are not implemented for the SigLIP tower",
        **without_videos(
            "Idefics3 / SmolVLM are driven with images here (their video input is frames written as images "
            "with text between them): no frame structure"
        ),
    }

    def __init__(self, model: nn.Module):
        self.model = model
        inner = getattr(model, "model", None)
        self.vlm = inner if inner is not None and hasattr(inner, "text_model") else model
        self.config = self.vlm.config
        self.stack = self.vlm.text_model
        self.vision_entry = self.vlm.vision_model  # one vision run: all real sub-images of the forward
        self.tower = self.vlm.vision_model
        self.projector = self.vlm.connector.modality_projection  # input: pixel-shuffled, one row per LLM token

    def decoder_spec(self) -> DecoderSpec:
        return DecoderSpec.for_llama_like(self.stack)

    def side(self) -> int:
        """Tokens per side of one sub-image after the pixel shuffle."""
        vision = self.config.vision_config
        size, patch = (v[0] if isinstance(v, (list, tuple)) else v for v in (vision.image_size, vision.patch_size))
        return int(size) // int(patch) // int(self.config.scale_factor)

    def strategy(self, call: ForwardCall) -> str:
        return "full"  # every SigLIP patch is a feature (no CLS token to strip)

    def cls_layer(self, call: ForwardCall) -> nn.Module:
        raise ValueError(f"{type(self.model).__name__}: {self.limitations['cls_attention']}")

    def image_counts(self, call: ForwardCall, num_image_tokens: int) -> list[int]:
        runs = placeholder_runs(call.kind_ids, self.name)
        tokens = self.side() ** 2  # image_seq_len: every sub-image has exactly this many placeholders
        if sum(runs) != num_image_tokens or any(run % tokens for run in runs):
            raise ValueError(
                f"{self.name}: placeholder runs {runs} are not whole sub-images of {tokens} tokens "
                f"(image_seq_len) covering the {num_image_tokens} image tokens"
            )
        return [tokens] * (num_image_tokens // tokens)  # adjacent sub-images without markers split too

    def layouts(self, call: ForwardCall, counts: list[int], token_embeds: list[Tensor]) -> list[ImageLayout]:
        return square_layouts(counts, self.side())

    def vision_rows(self, capture, layouts, token_embeds, per_crop: Tensor) -> list[Tensor]:
        return split_blocks(per_crop, [layout.num_tokens for layout in layouts], self.name)


class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM: Idefics3's architecture (same sub-image layout) with a SmolLM2 decoder; videos as frames."""

    name: ClassVar[str] = "smolvlm"
    description: ClassVar[str] = (
        "SmolVLM (SmolVLMForConditionalGeneration): image splitting into sub-images, video frames; one row per sub-image"
    )
    model_classes: ClassVar[tuple[str, ...]] = ("SmolVLMForConditionalGeneration", "SmolVLMModel")
