"""Adapter for LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``; also ``LlavaOnevisionModel``).

OneVision is LLaVA-NeXT's AnyRes packing (base view, unpadded crop grid with one ``image_newline`` per row)
with a SigLIP tower, a Qwen2 decoder, bilinear down-scaling of large crop grids (``vision_aspect_ratio``,
``"anyres_max_9"``) and videos. What differs from LLaVA-NeXT lives here:

- **Images and videos.** Placeholders are ``config.image_token_id`` and ``config.video_token_id``; each run
  is cut into consecutive items, images taking the rows of ``image_sizes`` and videos the rows of
  ``pixel_values_videos`` in batch order, exactly as the model scatters them (`video_items.CountedVideoItems`:
  `spans.find_visual_segments` with ``(1, 1, n)`` grids). **One `Signals` row per image and per video**, in sequence order;
  the budget applies per row.
- **Token counts, never hard-coded.** Per image: the lengths of ``mm_encoder_outputs["image"].pooler_output``
  when ``generate`` pre-encoded the images, else the model's own ``pack_image_features`` run on ones with the
  crop counts ``get_image_features`` uses (``image_size_to_num_patches`` for a sample with one image, one crop
  for every image of a multi-image sample when ``batch_num_images`` is given) and its ``vision_aspect_ratio``.
  Per video: the lengths of ``mm_encoder_outputs["video"].pooler_output``, else frames x the tokens of the
  model's own ``apply_pooling`` run on ones, plus the video's one ``image_newline``.
- **Newlines** (images: one per row of the crop grid, or one after a single-crop image; videos: one at the end)
  are exact copies of ``model.image_newline`` and ordinary candidates at ``pre_llm`` / ``layer``.
- **Views** (``Signals.view_index``, at ``pre_llm`` and ``layer``): as LLaVA-NeXT, 0 at an image's base crop
  tokens (its first ``_crop_tokens``), 1 at its crop grid's tokens, -1 at newlines; a video row is one view (0)
  and its newline -1 (G-Prune: one graph per view, newlines kept).
- **Frames** (``Signals.frames`` / ``frame_index``): a video row is (T, H, W) = (frames, ceil(side / 2),
  ceil(side / 2)) pooled tokens, frame-major, then its newline (``frame_index`` -1).
- **Prompt span**: as LLaVA (:func:`vtprune.adapters.spans.prompt_positions`), image *and* video placeholders
  excluded (the text after the sample's last image or video, up to ``prompt_stop``). For the Qwen2 chat
  template pass the ids of ``"<|im_end|>"`` as ``prompt_stop``.
- **Not provided**: the ``vision`` placement (large crop grids are bilinearly interpolated and video frames
  pooled after the projector, so an LLM token is not one vision-tower token) and ``cls_attention`` (SigLIP has
  no CLS token). Both fail at attach time with the model class, the placement and what is supported.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from .description import VLMAdapter
from .plan import ForwardCall
from .records import ImageLayout, with_frames
from .video_items import CountedVideoItems

__all__ = ["LlavaOnevisionAdapter"]


class LlavaOnevisionAdapter(CountedVideoItems, VLMAdapter):
    """LLaVA-OneVision: SigLIP + AnyRes crops with image-newline tokens + Qwen2 decoder; images and videos."""

    name: ClassVar[str] = "llava_onevision"
    description: ClassVar[str] = (
        "LLaVA-OneVision (LlavaOnevisionForConditionalGeneration): AnyRes crops with image-newline tokens, "
        "pooled video frames; one row per image and per video"
    )
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    drop_kinds: ClassVar[frozenset[str]] = frozenset({"pre_llm", "layer"})
    has_cls: ClassVar[bool] = False
    has_grid: ClassVar[bool] = False
    has_frames: ClassVar[bool] = True
    has_views: ClassVar[bool] = True
    pixel_kwargs: ClassVar[tuple[str, ...]] = ("pixel_values", "pixel_values_videos")
    limitations: ClassVar[dict[str, str]] = {
        "vision": "large crop grids are bilinearly interpolated and video frames pooled after the projector, so an "
        "LLM token is not one vision-tower token",
        "cls_attention": "the SigLIP vision tower has no CLS token",
        "pre_llm_clip": "CLIP-space signals are not implemented for OneVision's SigLIP tower",
        "vision_layers": "large crop grids are bilinearly interpolated and video frames pooled after the projector, "
        "which mixes merged tokens; images and videos run the same tower, which generate() encodes before any forward",
    }

    # -- model access ------------------------------------------------------------------------------------

    def cls_layer(self, call: ForwardCall) -> nn.Module:
        raise ValueError(
            f"{type(self.model).__name__}: the SigLIP vision tower has no CLS token, so cls_attention is not "
            f"available at any placement ({', '.join(sorted(self.placements))})"
        )

    def _crop_tokens(self, call: ForwardCall) -> int:
        """Vision-tower tokens of one crop after ``vision_feature_select_strategy`` (what the projector gets)."""
        side = self.patch_side()
        embeddings = getattr(self.tower, "embeddings", None)
        tokens = int(getattr(embeddings, "num_positions", side * side))  # SigLIP: patches; CLIP: patches + CLS
        return tokens - (1 if self.strategy(call) == "default" else 0)

    # -- token counts ------------------------------------------------------------------------------------

    def image_token_counts(self, call: ForwardCall, expected: Optional[int] = None) -> list[int]:
        """Tokens of each image of the forward, in batch order (see the module docstring).

        ``LlavaOnevisionModel.forward`` does not hand its ``vision_aspect_ratio`` to ``get_image_features``
        (transformers 5.x), which then uses the config's; the config's value is tried first and the call's
        only when the config's does not give the ``expected`` number of image placeholders.
        """
        encoded = (call.kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:  # generate() encodes the images before the forward (image_sizes is consumed there)
            return [int(f.shape[0]) for f in encoded.pooler_output]
        if call.kwargs.get("pixel_values") is None:
            return []
        sizes = call.kwargs.get("image_sizes")
        if sizes is None:
            raise ValueError(f"{self.name}: image_sizes is required to locate the image tokens")
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        numbers = call.kwargs.get("batch_num_images")
        if numbers is None:  # as get_image_features: every image is patched
            patched = [True] * len(sizes)
        else:  # only the image of a single-image sample is patched
            patched = [int(n) == 1 for n in numbers for _ in range(int(n))]
        crops = [
            image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=self.config.image_grid_pinpoints,
                patch_size=self.config.vision_config.image_size,
            )
            if patch
            else 1
            for size, patch in zip(sizes, patched)
        ]
        sizes = sizes[: len(crops)]
        ones = torch.ones(sum(crops), self._crop_tokens(call), 1)
        ratios = [getattr(self.config, "vision_aspect_ratio", None)]
        if call.kwargs.get("vision_aspect_ratio") not in (None, ratios[0]):
            ratios.append(call.kwargs["vision_aspect_ratio"])
        counts: list[int] = []
        for ratio in ratios:
            extra = {} if ratio is None else {"vision_aspect_ratio": ratio}
            packed, _ = self.vlm.pack_image_features(
                list(torch.split(ones, crops)), sizes, image_newline=ones.new_zeros(1), **extra
            )
            counts = [int(p.shape[0]) for p in packed]
            if expected is None or sum(counts) == expected:
                break
        return counts

    def video_token_counts(self, call: ForwardCall) -> list[int]:
        """Tokens of each video of the forward, in batch order (see the module docstring)."""
        encoded = (call.kwargs.get("mm_encoder_outputs") or {}).get("video")
        if encoded is not None:
            return [int(f.shape[0]) for f in encoded.pooler_output]
        videos = call.kwargs.get("pixel_values_videos")
        if videos is None:
            return []
        number, frames = int(videos.shape[0]), int(videos.shape[1])
        pooled = self.vlm.apply_pooling(torch.ones(frames, self._crop_tokens(call), 1))  # (frames, pooled, 1)
        return [int(pooled.shape[0] * pooled.shape[1]) + 1] * number  # + the video's image_newline

    def item_token_counts(self, call: ForwardCall, kinds: Tensor) -> tuple[list[int], list[int]]:
        images = self.image_token_counts(call, int((kinds == self.image_token_id).sum()))
        return images, self.video_token_counts(call)

    def pooled_frame(self) -> tuple[int, int]:
        """(H, W) of one video frame after the model's ``apply_pooling`` (bilinear, ``ceil(side / 2)`` per side)."""
        side = self.patch_side()
        return -(-side // 2), -(-side // 2)

    def layouts(self, call: ForwardCall, counts: list[int], token_embeds: list[Tensor]) -> list[ImageLayout]:
        """One layout per image / video; newline tokens are exact copies of the model's ``image_newline``. A video
        is ``T`` pooled (H, W) frames then one newline (its last token, ``frame_index`` -1).

        Views (`Signals.view_index`): ``pack_image_features`` puts an image's base crop first (one crop's tokens,
        ``_crop_tokens``: view 0), then its unpadded and, past ``anyres_max``, down-scaled crop grid (view 1); the
        image of a multi-image sample is one crop, its base view. A video is one view (0). Newlines: -1."""
        out = []
        height, width = self.pooled_frame()
        base = self._crop_tokens(call)  # tokens of one crop: the base view of a patched image
        for segment, count, embeds in zip(self.segments(call), counts, token_embeds):
            newline = (embeds == self.vlm.image_newline.to(embeds.device, embeds.dtype)).all(dim=-1)  # (n,)
            views = torch.zeros(count, dtype=torch.long)  # (n,)
            if segment.kind == "image":
                views[min(base, count) :] = 1
            views[newline.cpu()] = -1
            layout = ImageLayout(count, newline if bool(newline.any()) else None, None, kind=segment.kind, views=views)
            if segment.kind == "video":
                last = torch.zeros(count, dtype=torch.bool)
                last[-1] = True  # the video's image_newline
                layout = with_frames(layout, ((count - 1) // (height * width), height, width), last)
            out.append(layout)
        return out
