"""CLIP-space signals (``clip_visual``, ``clip_text``, ``clip_text_mask``) for the ``pre_llm_clip`` placement.

CDPruner (github.com/Theia-4869/CDPruner @ 9541616c, ``clip_encoder.py`` ``load_text_tower`` / ``forward``)
scores the patches by their CLIP image-text similarity to the instruction:

* image side: the vision tower's *selected* patch features (``hidden_states[vision_feature_layer]`` after the
  select strategy: exactly the projector input) through the **tower's own** ``post_layernorm``, then CLIP's
  ``visual_projection`` applied in float32 (``visual_projection(post_layernorm(features).float())``). The
  projection head comes from the CLIP checkpoint matching the tower (the VLM checkpoint has none).
* text side: the instruction text tokenized by CLIP's tokenizer **without truncation**, right-padded with zeros
  (ids and attention mask) to a multiple of the text tower's ``max_position_embeddings`` (77) and cut into
  segments of that length; ``text_embeds`` (pooled output through ``text_projection``) of every segment:
  ``M`` = number of segments.

The adapters get the instruction text by decoding the prompt span (``vtprune.adapters.base.prompt_positions``:
text after the last image up to ``prompt_stop``) with the VLM's own tokenizer (``skip_special_tokens=True``,
stripped), which the user passes (``framework.prune(..., clip_model=..., tokenizer=processor)``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

__all__ = ["ClipSignals", "CLIP_OPTIONS"]

#: Adapter options (keyword arguments of ``framework.prune``) consumed by :class:`ClipSignals`.
CLIP_OPTIONS = frozenset({"clip_model", "clip_tokenizer", "tokenizer"})


def _load_tokenizer(source: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


class ClipSignals:
    """A CLIP model's projection heads and text tower, used to compute CDPruner's CLIP-space signals.

    Args:
        clip_model: a ``transformers.CLIPModel`` or a path / hub id for ``CLIPModel.from_pretrained`` (the CLIP
            checkpoint of the vision tower, e.g. ``"openai/clip-vit-large-patch14-336"`` for LLaVA-1.5).
        tokenizer: the VLM's tokenizer, or its processor (anything with ``decode`` or ``tokenizer.decode``), used to
            turn the prompt span's ids back into text.
        clip_tokenizer: CLIP's tokenizer; default ``AutoTokenizer.from_pretrained`` of ``clip_model``'s path (or of
            ``clip_model.name_or_path`` for a loaded model).
        tower: the VLM's vision transformer (``post_layernorm``, ``config.hidden_size``): sizes are checked
            against the CLIP model here, before any hook is installed.
    """

    def __init__(self, clip_model: Any, tokenizer: Any, tower: nn.Module, clip_tokenizer: Any = None):
        if clip_model is None:
            raise ValueError("no CLIP model given")
        if isinstance(clip_model, (str, bytes)) or hasattr(clip_model, "__fspath__"):
            from transformers import CLIPModel

            source = clip_model
            clip_model = CLIPModel.from_pretrained(clip_model)
        else:
            source = getattr(clip_model, "name_or_path", None) or getattr(clip_model.config, "_name_or_path", None)
        for part in ("visual_projection", "text_model", "text_projection"):
            if not hasattr(clip_model, part):
                raise TypeError(f"clip_model must be a transformers CLIPModel (no {part!r} on {type(clip_model).__name__})")
        if tokenizer is None:
            raise ValueError(
                "pre_llm_clip needs the VLM's tokenizer (or processor) to turn the prompt ids into text: "
                "framework.prune(..., clip_model=..., tokenizer=processor)"
            )
        self.decoder = getattr(tokenizer, "tokenizer", tokenizer) if not hasattr(tokenizer, "decode") else tokenizer
        if clip_tokenizer is None:
            if not source:
                raise ValueError("clip_tokenizer is required when clip_model has no name_or_path to load it from")
            clip_tokenizer = _load_tokenizer(source)
        self.clip_tokenizer = clip_tokenizer
        self.model = clip_model.eval()
        width = int(tower.config.hidden_size)
        if clip_model.visual_projection.in_features != width:
            raise ValueError(
                f"clip_model does not match the vision tower: its visual_projection takes {clip_model.visual_projection.in_features} "
                f"features, the tower outputs {width}"
            )
        if getattr(tower, "post_layernorm", None) is None:
            raise ValueError(f"{type(tower).__name__} has no post_layernorm: CLIP image embeddings are not available")
        self.post_layernorm = tower.post_layernorm
        self.segment = int(clip_model.config.text_config.max_position_embeddings)

    # -- image ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def image_embeds(self, features: Tensor) -> Tensor:
        """(crops, n, C) fp32 CLIP image embeddings of the projector input ``features`` (crops, n, Dv)."""
        if features.shape[-1] != self.model.visual_projection.in_features:
            raise ValueError(
                f"pre_llm_clip: the projector input has {features.shape[-1]} features per token, CLIP's visual_projection "
                f"takes {self.model.visual_projection.in_features} (several vision_feature_layer values are not supported)"
            )
        normed = self.post_layernorm(features)
        weight = self.model.visual_projection.weight
        return torch.nn.functional.linear(normed.float(), weight.float().to(normed.device))

    # -- text -------------------------------------------------------------------------------------------

    def prompt_text(self, ids: Tensor) -> str:
        """The prompt span's ids decoded with the VLM's tokenizer (special tokens skipped, stripped)."""
        return self.decoder.decode(ids.tolist(), skip_special_tokens=True).strip()

    @torch.no_grad()
    def text_embeds(self, text: str) -> Tensor:
        """(M, C) fp32: CLIP ``text_embeds`` of each ``max_position_embeddings``-token segment of ``text``."""
        encoded = self.clip_tokenizer(text=text, return_tensors="pt")
        ids = encoded["input_ids"]
        mask = encoded.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        length = ids.shape[1]
        segments = (length - 1) // self.segment + 1
        padding = self.segment * segments - length
        ids = torch.cat([ids, ids.new_zeros(1, padding)], dim=1).reshape(-1, self.segment)
        mask = torch.cat([mask, mask.new_zeros(1, padding)], dim=1).reshape(-1, self.segment)
        device = self.model.text_projection.weight.device
        pooled = self.model.text_model(input_ids=ids.to(device), attention_mask=mask.to(device)).pooler_output
        return self.model.text_projection(pooled).float()

    def prompt_embeds(self, ids: Tensor, cache: Optional[dict] = None) -> Tensor:
        """(M, C) text embeddings of a prompt span given as ids (cached per text within one forward)."""
        text = self.prompt_text(ids)
        if cache is not None and text in cache:
            return cache[text]
        out = self.text_embeds(text)
        if cache is not None:
            cache[text] = out
        return out
