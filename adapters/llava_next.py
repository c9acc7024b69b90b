"""Adapter for LLaVA-NeXT / LLaVA-1.6 (``LlavaNextForConditionalGeneration``; also ``LlavaNextModel``).

AnyRes: an image is a base view plus a grid of crops; the model packs them into one token sequence
(base tokens, then the unpadded crop grid row by row, each row followed by an ``image_newline`` token).
One `Signals` row is one whole image: the budget applies over all of its tokens, newline tokens included
(at ``pre_llm`` / ``layer`` they are ordinary candidates with their own embeddings / hidden states).

Layout per image (token count and newline positions) is derived by running the model's own
``pack_image_features`` on a tensor of ones with a zero ``image_newline`` (no copied packing logic), with
the crop count from ``image_size_to_num_patches`` and ``image_sizes``; the placeholders of the input are cut
into consecutive images of those sizes (row-major), so several images per prompt work.

At ``vision`` the signals are the vision-encoder outputs packed the same way; newline tokens have no
vision-space feature: they are masked out (``visual_mask`` False) and therefore dropped. ``cls_attention``
is the CLS row of every crop, packed the same way (0 at newline tokens). No ``grid`` (the layout is not a
single patch grid). ``view_index`` (every drop kind but ``vision_layers``): 0 at the base image's tokens, 1 at the
high-resolution crops' tokens, -1 at newlines (G-Prune's two graphs).

Prompt span: as for LLaVA (:func:`vtprune.adapters.spans.prompt_positions`); for the Mistral template
``"[INST] <image>\\n{question} [/INST]"`` pass the ids of ``" [/INST]"`` as ``prompt_stop``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .description import VLMAdapter, without_videos
from .plan import ForwardCall
from .records import ImageLayout
from .value_match import value_ids, value_table

__all__ = ["LlavaNextAdapter"]


class LlavaNextAdapter(VLMAdapter):
    """LLaVA-NeXT: AnyRes crops + image-newline tokens."""

    name: ClassVar[str] = "llava_next"
    description: ClassVar[str] = "LLaVA-NeXT (LlavaNextForConditionalGeneration): AnyRes crops with image-newline tokens"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaNextForConditionalGeneration", "LlavaNextModel")
    has_grid: ClassVar[bool] = False
    has_views: ClassVar[bool] = True
    limitations: ClassVar[dict[str, str]] = {
        "pre_llm_clip": "CLIP-space signals of AnyRes crops are not implemented",
        "relevance.flowcut": "FlowCut's AnyRes path (half the target per crop, crops re-gridded without newlines, a "
        "second step in the LLM) is not implemented",
        **without_videos(
            "LLaVA-NeXT takes images only: no video rows, so no frame structure"
        ),
    }

    #: ``vision_layers``: ToMe inside the CLIP tower per crop (``adapters/tower_merge.py``), every patch position
    #: given its merged token's value, one representative per merged token kept (``adapters/tower_scatter.py``).
    drop_kinds: ClassVar[frozenset[str]] = VLMAdapter.drop_kinds | {"vision_layers"}
    tower_layout: ClassVar[str] = "sources"

    def _crops(self, call: ForwardCall) -> tuple[list[int], Tensor]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        sizes = call.kwargs.get("image_sizes")
        if sizes is None:
            raise ValueError("llava_next: image_sizes is required to locate the image tokens")
        crops = [
            image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=self.config.image_grid_pinpoints,
                patch_size=self.config.vision_config.image_size,
            )
            for size in sizes
        ]
        return crops, sizes

    def image_counts(self, call: ForwardCall, num_image_tokens: int) -> list[int]:
        encoded = (call.kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:  # generate() encodes the images before the forward (image_sizes is consumed there)
            return [int(f.shape[0]) for f in encoded.pooler_output]
        crops, sizes = self._crops(call)
        side = self.patch_side()
        per_crop_tokens = side * side + (0 if self.strategy(call) == "default" else 1)
        ones = torch.ones(sum(crops), per_crop_tokens, 1)
        packed, _ = self.vlm.pack_image_features(
            list(torch.split(ones, crops)), sizes, self.strategy(call), image_newline=ones.new_zeros(1)
        )
        return [int(p.shape[0]) for p in packed]

    def layouts(self, call: ForwardCall, counts: list[int], token_embeds: list[Tensor]) -> list[ImageLayout]:
        """Newline tokens are exact copies of the model's ``image_newline`` vector; the views (`Signals.view_index`):
        ``pack_image_features`` puts the base crop's tokens first (one crop's tokens, as in `image_counts`), then the
        high-resolution crops (view 1) with their newlines (-1); an image of one crop is its base view and a newline."""
        base = self.patch_side() ** 2 + (0 if self.strategy(call) == "default" else 1)  # tokens of one crop
        out = []
        for count, embeds in zip(counts, token_embeds):
            newline = (embeds == self.vlm.image_newline.to(embeds.device, embeds.dtype)).all(dim=-1)  # (n,)
            views = torch.ones(count, dtype=torch.long)  # (n,)
            views[: min(base, count)] = 0
            views[newline.cpu()] = -1
            out.append(ImageLayout(count, newline if bool(newline.any()) else None, None, views=views))
        return out

    def vision_rows(self, capture, layouts, token_embeds, per_crop: Tensor) -> list[Tensor]:
        """Align per-crop vision-side rows with the packed LM tokens by matching every image token's input
        embedding to the projector output it was copied from (packing only reshapes, slices and inserts
        newlines, so each non-newline token equals exactly one projected crop token)."""
        projected = capture.projected
        if projected is None:
            raise RuntimeError("llava_next: the projector output was not captured")
        table = value_table(projected)
        source = per_crop.reshape(-1, per_crop.shape[-1])
        rows = []
        for embeds in token_embeds:
            index = value_ids(table, embeds, projected.dtype)  # (n,), -1 = no projected row (newlines)
            found = (index >= 0).to(source.device)
            row = source[index.clamp(min=0).to(source.device)]
            rows.append(torch.where(found.unsqueeze(-1), row, torch.zeros_like(row)))
        return rows
