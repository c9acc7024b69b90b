"""Adapter for LLaVA-OneVision-1.5 (``LlavaOnevision15ForConditionalGeneration``, ``LlavaOnevision15Model``): a
Qwen-style vision side (RICE-ViT tower with 2-D rotary positions, ``image_grid_thw`` / ``video_grid_thw``, a
patch merger fusing ``m x m`` patches into one LLM token) in front of a plain Qwen3 decoder with **1-D** positions.

Reading the modeling file: the model scatters the merger output into the ``image_token_id`` / ``video_token_id``
placeholders exactly as Qwen2-VL does, but gives the text model ``arange`` positions (``generate``: the
attention mask's cumulative sum), no M-RoPE. So this description is the Qwen2-VL one (``adapters.qwen2_vl``:
visual spans cut by the grids, the Qwen prompt rule, the ``vision`` capture of merge units before the merger)
with the LLaVA-family decoder driving (``DecoderSpec.for_llama_like``, 1-D ``keep`` / ``compact`` positions, no
extension hooks):

- **Visual tokens**: every run of image / video placeholders between ``<|vision_start|>`` and
  ``<|vision_end|>``, cut into items of ``t * (h / m) * (w / m)`` tokens; one `Signals` row per image or video.
  ``<|vision_start|>`` / ``<|vision_end|>`` are text, never prunable.
- **Vision placement**: the merger's input grouped into merge units (``Signals.visual``: (R, N, m*m*Dv)); values go
  back through the merger (`project`). The tower's per-frame CLS token is removed by the tower itself before the
  merger, so every merge unit is one LLM token.
- **Not provided**: ``cls_attention`` / ``visual_keys`` at ``vision`` (the per-frame CLS token of the tower is not
  among the features the model uses and its attention row is not captured), CLIP-space signals.

>>> sorted(LlavaOnevision15Adapter.placements)
['layer', 'pre_llm', 'schedule', 'sparse_layers', 'vision']
"""

from __future__ import annotations

from typing import ClassVar, Optional

from torch import Tensor, nn

from .decoder import DecoderSpec
from .description import Extension, VLMAdapter
from .plan import ForwardCall
from .qwen2_vl import QwenVLAdapter

__all__ = ["LlavaOnevision15Adapter"]


class LlavaOnevision15Adapter(QwenVLAdapter):
    """LLaVA-OneVision-1.5: the Qwen2-VL vision description on a Llama-like (Qwen3) decoder with 1-D positions."""

    name: ClassVar[str] = "llava_onevision1_5"
    description: ClassVar[str] = (
        "LLaVA-OneVision-1.5 (LlavaOnevision15ForConditionalGeneration, LlavaOnevision15Model): RICE-ViT with "
        "dynamic resolution and a patch merger, Qwen3 decoder with 1-D positions, images and videos"
    )
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaOnevision15ForConditionalGeneration", "LlavaOnevision15Model")
    limitations: ClassVar[dict[str, str]] = {
        "cls_attention": "the RICE-ViT tower's per-frame CLS token is dropped before the merger and its attention "
        "row is not captured",
        "visual_keys": "at vision: no CLS attention layer is captured for the RICE-ViT tower",
        "pre_llm_clip": "LLaVA-OneVision-1.5's tower is not a CLIP model: no CLIP text space",
    }

    def decoder_spec(self) -> DecoderSpec:
        """The Qwen3 text model is Llama-like and takes 1-D position ids."""
        return VLMAdapter.decoder_spec(self)

    def extensions(self) -> tuple[Extension, ...]:
        return ()  # no M-RoPE: the model's own 1-D positions reach the stack

    @property
    def vision_width(self) -> int:
        """Dv, the width of one patch at the merger's input (its pre-merge ``norm``)."""
        return int(self.config.vision_config.hidden_size)

    def window_order(self, grid_thw: Tensor) -> Optional[Tensor]:
        return None  # no window attention in the RICE-ViT tower

    def cls_layer(self, call: ForwardCall) -> nn.Module:
        raise ValueError(
            f"{type(self.model).__name__}: {self.limitations['cls_attention']}, so cls_attention is not available at "
            "any placement; use a relevance stage that reads the prompt or the LLM attention instead"
        )
