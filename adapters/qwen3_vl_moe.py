"""Adapter for Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``, ``Qwen3VLMoeModel``): Qwen3-VL with a
mixture-of-experts decoder.

The model is Qwen3-VL (``adapters.qwen3_vl``) with the dense MLP of the text layers replaced by a sparse MoE block:
the vision tower, the patch merger, the DeepStack mergers, the interleaved M-RoPE and the way inputs are written
(images, frame-by-frame timestamped videos) are the same modules under new names. Every description piece of
`Qwen3VLAdapter` therefore applies unchanged (visual items, prompt span, ``(4, B, L)`` stack positions, DeepStack
features following the kept tokens, ``vision`` on merge units before the main merger). The experts route each
token on its own hidden state (top-k per token), so dropping a token changes nothing about how the others are
routed; the attention rows of ``layer(k)`` drops are recomputed from the layers' own ``q_proj`` / ``k_proj`` /
``q_norm`` / ``k_norm`` as for Qwen3-VL.

>>> sorted(Qwen3VLMoeAdapter.placements)
['layer', 'pre_llm', 'schedule', 'sparse_layers', 'vision']
"""

from __future__ import annotations

from typing import ClassVar

from .qwen3_vl import Qwen3VLAdapter

__all__ = ["Qwen3VLMoeAdapter"]


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL-MoE: the Qwen3-VL description (DeepStack, interleaved M-RoPE) on a MoE decoder."""

    name: ClassVar[str] = "qwen3_vl_moe"
    description: ClassVar[str] = (
        "Qwen3-VL-MoE (Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeModel): Qwen3-VL (interleaved M-RoPE, images "
        "and timestamped videos, DeepStack features pruned with the tokens) with a mixture-of-experts decoder"
    )
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeModel")
    limitations: ClassVar[dict[str, str]] = {
        "cls_attention": "the Qwen3-VL-MoE vision tower has no CLS token",
        "visual_keys": "at vision: the Qwen3-VL-MoE vision tower has no CLS layer to take keys from",
        "pre_llm_clip": "Qwen3-VL-MoE's tower is not a CLIP model: no CLIP text space",
    }
