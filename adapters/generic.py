"""Generic adapter: any transformers VLM that follows the standard multimodal interface.

The interface (shared by most ``*ForConditionalGeneration`` VLMs of transformers 5): an image placeholder id in the
config (``image_token_id`` / ``image_token_index``; videos: ``video_token_id`` / ``video_token_index``), a
``get_image_features`` method, and a ``language_model`` decoder that receives the merged ``inputs_embeds``. The
model scatters its features into the placeholders before the decoder, so the decoder machinery can drop visual
tokens at its input (``pre_llm``) and, for a Llama-like decoder (``layers``, ``rotary_emb``, the modeling module's
``apply_rotary_pos_emb``), inside it (``layer(k)``, ``schedule``).

**Lookup.** The registry consults ``model_classes`` first (over the model's class and its bases); only when no
adapter names the class does it ask the adapters that define a capability probe ``accepts(model)`` (this one),
so a specific adapter always wins. ``vtprune list --model CLASS`` prints which adapter a class resolves to.

**Rows.** The generic adapter does not know how a family packs its images, so one `Signals` row is one contiguous
run of placeholders of one kind (image or video) in a sample, in sequence order; two images whose placeholders
touch form one row (a specific adapter cuts them). Every placeholder is a visual token; marker / newline / break
tokens that are not placeholders are text and never pruned.

**Not provided**: ``vision`` (how the tower's features map to LLM tokens is family-specific), ``cls_attention``,
grids, CLIP-space signals, and M-RoPE (3-D position) decoders, which the probe rejects.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from vtprune.framework.errors import VtpruneError

from .decoder import DecoderSpec
from .description import VLMAdapter, without_videos
from .plan import ForwardCall
from .records import ImageLayout

__all__ = ["GenericAdapter", "placeholder_id"]

#: Config attribute names of the placeholder ids, by visual kind (transformers spells both).
PLACEHOLDER_NAMES: dict[str, tuple[str, ...]] = {
    "image": ("image_token_id", "image_token_index"),
    "video": ("video_token_id", "video_token_index"),
}


def placeholder_id(config: Any, kind: str) -> Optional[int]:
    """The placeholder token id of ``kind`` ("image" or "video") in a VLM config, or None."""
    for name in PLACEHOLDER_NAMES[kind]:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _multimodal(model: nn.Module) -> nn.Module:
    """The module holding ``language_model`` (``model.model`` for a ``*ForConditionalGeneration``)."""
    inner = getattr(model, "model", None)
    return inner if inner is not None and hasattr(inner, "language_model") else model


def _three_d_positions(klass: type, config: Any) -> bool:
    """Whether the model builds M-RoPE (3-D) positions (an ``mrope_section`` in its text config, or a
    ``get_rope_index`` in its modeling module, as Qwen-VL and GLM-4V do), which the generic path does not build."""
    text = getattr(config, "text_config", config)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    if isinstance(rope, dict) and "mrope_section" in rope:
        return True
    module = inspect.getmodule(klass)
    return any(isinstance(value, type) and hasattr(value, "get_rope_index") for value in vars(module).values())


class GenericAdapter(VLMAdapter):
    """Any VLM with a config placeholder id, ``get_image_features`` and a ``language_model`` (see the module)."""

    name: ClassVar[str] = "generic"
    description: ClassVar[str] = (
        "any transformers VLM with the standard multimodal interface (image_token_id, get_image_features, "
        "language_model); chosen only when no adapter names the class; one row per run of placeholders"
    )
    model_classes: ClassVar[tuple[str, ...]] = ()
    drop_kinds: ClassVar[frozenset[str]] = frozenset({"pre_llm", "layer"})
    has_grid: ClassVar[bool] = False
    has_cls: ClassVar[bool] = False
    options: ClassVar[frozenset[str]] = frozenset()
    pixel_kwargs: ClassVar[tuple[str, ...]] = ("pixel_values", "pixel_values_videos")
    limitations: ClassVar[dict[str, str]] = {
        "vision": "the generic adapter does not know how the vision tower's features map to LLM tokens "
        "(write a specific adapter, docs/adapters.md)",
        "cls_attention": "the generic adapter does not locate a CLS token in the vision tower",
        "pre_llm_clip": "CLIP-space signals need a specific adapter",
        **without_videos(
            "the generic adapter knows image placeholders only: no video rows, so no frame structure"
        ),
    }

    @classmethod
    def accepts(cls, model: Any) -> bool:
        """Capability probe (consulted only when no adapter's ``model_classes`` names the model's class): a model
        with ``get_image_features``, an image placeholder id in its config and 1-D (not M-RoPE) positions; an
        instance also needs a ``language_model``. A class is judged on its default config."""
        klass = model if isinstance(model, type) else type(model)
        if not callable(getattr(klass, "get_image_features", None)):
            return False
        if isinstance(model, type):  # a class: probe its default config (no weights are built)
            try:
                config = klass.config_class()
            except Exception:  # noqa: BLE001 - a config that needs arguments: judge by the method alone
                return True
            return placeholder_id(config, "image") is not None and not _three_d_positions(klass, config)
        vlm = _multimodal(model)
        config = getattr(vlm, "config", None)
        return (
            hasattr(vlm, "language_model")
            and config is not None
            and placeholder_id(config, "image") is not None
            and not _three_d_positions(klass, config)
        )

    def __init__(self, model: nn.Module):
        self.model = model
        self.vlm = _multimodal(model)
        self.config = self.vlm.config
        self.stack = self.vlm.language_model
        self.vision_entry = self.tower = self.projector = None  # unused: no vision placement, no CLS
        self.video_token_id = placeholder_id(self.config, "video")

    @property
    def image_token_id(self) -> int:
        value = placeholder_id(self.config, "image")
        if value is None:
            raise VtpruneError(f"{type(self.model).__name__}: its config has no image_token_id")
        return value

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        video = () if self.video_token_id is None else (self.video_token_id,)
        return (self.image_token_id, *video)

    def decoder_spec(self) -> DecoderSpec:
        """A Llama-like spec; a decoder without ``apply_rotary_pos_emb`` still supports ``pre_llm`` (attention rows,
        needed by ``layer`` drops only, then raise)."""
        stack = self.stack
        if not hasattr(stack, "layers") or not hasattr(stack, "rotary_emb"):
            raise VtpruneError(
                f"generic adapter: the decoder {type(stack).__name__} of {type(self.model).__name__} is not "
                "Llama-like (needs `layers` and `rotary_emb`); write a specific adapter (docs/adapters.md)"
            )
        try:
            return DecoderSpec.for_llama_like(stack)
        except TypeError:
            name = type(stack).__name__

            def no_rope(*args: Any) -> Any:
                raise VtpruneError(f"generic adapter: {name} has no apply_rotary_pos_emb; layer drops need a specific adapter")

            return DecoderSpec.for_llama_like(stack, apply_rope=no_rope)

    def image_counts(self, call: ForwardCall, num_image_tokens: int) -> list[int]:
        """Tokens of each contiguous run of same-kind placeholders, row-major over the batch."""
        kinds = call.kind_ids  # (B, L) long, -1 off placeholders
        if kinds is None:
            raise ValueError(f"{self.name}: the placeholders of this forward could not be located")
        before = torch.cat([kinds.new_full((kinds.shape[0], 1), -1), kinds[:, :-1]], dim=1)  # (B, L)
        visual = kinds >= 0
        starts = (visual & (kinds != before))[visual]  # (T,) bool, row-major over the visual tokens
        first = starts.nonzero().flatten().tolist() + [int(starts.numel())]
        return [b - a for a, b in zip(first[:-1], first[1:])]

    def layouts(self, call: ForwardCall, counts: list[int], token_embeds: list[Tensor]) -> list[ImageLayout]:
        kinds = call.kind_ids
        visual = kinds[kinds >= 0]  # (T,) placeholder id of every visual token, row-major
        out, offset = [], 0
        for count in counts:
            kind = "video" if int(visual[offset]) == self.video_token_id else "image"
            out.append(ImageLayout(count, None, None, kind=kind))
            offset += count
        return out

    def cls_layer(self, call: ForwardCall) -> nn.Module:
        raise ValueError(f"{type(self.model).__name__}: the generic adapter provides no cls_attention")
