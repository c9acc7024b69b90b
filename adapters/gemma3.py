"""Adapter for Gemma 3 (``Gemma3ForConditionalGeneration``; also its base ``Gemma3Model``).

Gemma 3 gives every image (and, with pan-and-scan, every crop of an image: the processor adds each crop as one more
image of the prompt) ``config.mm_tokens_per_image`` placeholder tokens (``config.image_token_id``), the SigLIP
patches average-pooled to a ``s x s`` grid (``s = sqrt(mm_tokens_per_image)``), framed by ``<start_of_image>`` /
``<end_of_image>`` text tokens.

- **Visual tokens**: the image placeholders, one `Signals` row per image or crop (``Signals.grid`` = (s, s)). The
  ``<start_of_image>`` / ``<end_of_image>`` markers are text tokens: never candidates, never dropped.
- **Attention mask**: with ``token_type_ids`` (what the processor returns), the tokens of one image block attend to
  each other bidirectionally (``Gemma3Model`` builds a per-layer-type dict of masks: full-attention layers
  ``causal OR same-block``, sliding layers ``(causal OR same-block) AND window``). After a drop the kept slots get
  exactly that mask over the kept tokens: the block ids of the forward's ``token_type_ids`` are gathered onto the
  slots and the two masks rebuilt with transformers' own ``create_causal_mask`` overlays, per layer
  (``DecoderSpec.layer_kwargs``), with each layer type's own rotary embedding; the decoder machinery reads the 2-D
  padding mask from the forward's ``attention_mask`` (``DecoderSpec.stack_mask2d``). Decoding steps are plain
  causal, as in the unpruned model; their masks are rebuilt per layer type too (every segment, segment 0
  included), the sliding window over original positions.
- **Limitations**: ``vision`` (the tower's patches are pooled ``k x k`` into one LLM token: no one-feature-per-token
  alignment); no CLS token. Sliding layers use the window over the tokens' original positions (as the unpruned
  model), at the pruned prefill and at every decoding step: a sliding cache layer keeps its last ``window - 1``
  slots, which hold every kept key of the original window (kept slots are a subset of the positions, in order);
  the mask hides the older ones it may also hold.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from .decoder import DecoderSpec, gather_seq
from .description import Extension, VLMAdapter, without_videos
from .plan import ForwardCall
from .records import ImageLayout
from .segments import Segment

__all__ = ["Gemma3Adapter", "CallLink"]


def _original_window(index: Tensor, window: int):
    """Sliding-window overlay over the slots' *original* positions ``index`` (B, Ls): a slot sees the keys less than
    ``window`` original tokens back, as in the unpruned sequence (transformers' overlay counts slots)."""

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return index[batch_idx, kv_idx] > index[batch_idx, q_idx] - window

    return inner


class CallLink(Extension):
    """Gives the decoder spec's callbacks the runtime's multimodal forward in flight (installs no hook)."""

    def __init__(self) -> None:
        self.runtime: Any = None

    def install(self, runtime: Any) -> list:
        self.runtime = runtime
        return []

    def remove(self) -> None:
        self.runtime = None

    def call(self) -> Optional[ForwardCall]:
        return self.runtime.current_call() if self.runtime is not None else None


class Gemma3Adapter(VLMAdapter):
    """Gemma 3: SigLIP tower + pooled projector, Gemma 3 decoder (sliding / full layers, bidirectional image blocks)."""

    name: ClassVar[str] = "gemma3"
    description: ClassVar[str] = (
        "Gemma 3 (Gemma3ForConditionalGeneration): pooled SigLIP tokens, bidirectional image blocks, pan-and-scan crops"
    )
    model_classes: ClassVar[tuple[str, ...]] = ("Gemma3ForConditionalGeneration", "Gemma3Model")
    drop_kinds: ClassVar[frozenset[str]] = frozenset({"pre_llm", "layer"})
    has_grid: ClassVar[bool] = True
    has_cls: ClassVar[bool] = False
    options: ClassVar[frozenset[str]] = frozenset()
    limitations: ClassVar[dict[str, str]] = {
        "vision": "Gemma 3 average-pools k x k SigLIP patches into one LLM token (no vision feature per LLM token)",
        "cls_attention": "the SigLIP vision tower has no CLS token",
        "pre_llm_clip": "CLIP-space signals are not implemented for Gemma 3",
        **without_videos(
            "Gemma 3 takes images only: no video rows, so no frame structure"
        ),
    }

    def __init__(self, model: Any):
        super().__init__(model)
        self.text_config = self.stack.config
        self.layer_types = list(self.text_config.layer_types)
        self._link = CallLink()

    def extensions(self) -> tuple[Extension, ...]:
        return (self._link,)

    # -- images -----------------------------------------------------------------------------------------

    def image_counts(self, call: ForwardCall, num_image_tokens: int) -> list[int]:
        per_image = int(self.config.mm_tokens_per_image)
        encoded = (call.kwargs.get("mm_encoder_outputs") or {}).get("image")
        images = int(encoded.pooler_output.shape[0]) if encoded is not None else int(call.kwargs["pixel_values"].shape[0])
        if images * per_image != num_image_tokens:
            raise ValueError(f"gemma3: {num_image_tokens} image tokens for {images} images of {per_image} tokens")
        return [per_image] * images

    def layouts(self, call: ForwardCall, counts: list[int], token_embeds: list[Tensor]) -> list[ImageLayout]:
        side = int(round(int(self.config.mm_tokens_per_image) ** 0.5))
        return [ImageLayout(c, None, (side, side) if side * side == c else None) for c in counts]

    # -- decoder ------------------------------------------------------------------------------------------

    def decoder_spec(self) -> DecoderSpec:
        rotary = self.stack.rotary_emb
        return DecoderSpec.for_llama_like(
            self.stack,
            rope=lambda hidden, positions: rotary(hidden, positions, "full_attention"),  # per type: layer_kwargs
            stack_mask2d=self._stack_mask2d,
            layer_kwargs=self._layer_kwargs,
        )

    def _stack_mask2d(self, kwargs: dict) -> Optional[Tensor]:
        """The forward's 2-D ``attention_mask`` from which ``Gemma3Model`` built its mask dict (None: no padding)."""
        call = self._link.call()
        mask = call.kwargs.get("attention_mask") if call is not None else None
        return mask if isinstance(mask, Tensor) and mask.dim() == 2 else None

    def _blocks(self, segment: Segment) -> Optional[Tensor]:
        """(B, Ls) image-block id of every slot (-1: text, filler), from the forward's ``token_type_ids``."""
        from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

        call = self._link.call()
        types = call.kwargs.get("token_type_ids") if call is not None else None
        if types is None:
            return None
        blocks = get_block_sequence_ids_for_mask(types, device=segment.index.device)  # (B, L)
        slots = gather_seq(blocks, segment.index, 1)  # (B, Ls)
        return torch.where(segment.valid, slots, torch.full_like(slots, -1))

    def _layer_kwargs(self, layer: int, hidden: Tensor, kwargs: dict, segment: Segment, cache: Any, prefill: bool) -> dict:
        """Layer ``layer``'s rotary embedding of its own type at the slots' position ids, and its own mask type
        rebuilt over the slots: at prefill with the image blocks bidirectional; while decoding (``segment`` is the
        decoding view: prefill slots, then the new tokens) plain causal. Sliding layers count their window in
        original positions both times (a pruned sequence's slots are not its positions)."""
        from transformers.masking_utils import blockwise_overlay, create_causal_mask

        kind = self.layer_types[layer]
        kwargs["position_embeddings"] = self.stack.rotary_emb(hidden, kwargs["position_ids"], kind)
        window = self.text_config.sliding_window
        blocks = self._blocks(segment) if prefill else None  # decoding: new tokens are text, plain causal
        mask_kwargs = dict(
            config=self.text_config,
            inputs_embeds=hidden,
            attention_mask=segment.mask2d,
            cache=cache,
            position_ids=None,
            layer_idx=layer if cache is not None else None,
        )
        if kind == "sliding_attention":
            extra = {"and_mask_function": _original_window(segment.index, int(window))} if window is not None else {}
            if blocks is not None:
                extra["or_mask_function"] = blockwise_overlay(blocks)
            kwargs["attention_mask"] = create_causal_mask(**mask_kwargs, **extra)
        else:
            kwargs["attention_mask"] = create_causal_mask(**mask_kwargs, block_sequence_ids=blocks)
        return kwargs
