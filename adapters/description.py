"""`VLMAdapter`: the description of a model family that the one hook runtime (``adapters.runtime``) attaches.

A description says, for one model instance: which modules matter (language stack, vision entry, tower,
projector), which placeholder ids are visual tokens and how they are cut into images (`image_counts`,
`layouts`), where the prompt is (`prompt_span`), how to drive the decoder (`decoder_spec`), how vision-space
values reach the LLM (`project`), how the vision side is captured (`vision_hooks`, `vision_features`), any extra
hooks the family needs (`extensions`), and what it supports: the drop kinds it implements (``drop_kinds``), the
signals it fills at each (`provides`), why something is missing (``limitations``) and its options.

The defaults describe the LLaVA family (CLIP-style tower with a CLS token, MLP projector, Llama-like decoder);
a new family is one module subclassing this and overriding what differs (docs/adapters.md, "Writing an adapter").
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional, Sequence

from torch import Tensor, nn

from vtprune.framework.support import (
    CLS_SIGNALS,
    EMBEDDING_SIGNALS,
    GRID_SIGNALS,
    LAYER_SIGNALS,
    PLACEMENT_KINDS,
    PLACEMENT_REQUESTS,
    VISION_SIGNALS,
    drop_kind,
)
from vtprune.framework.signals import VIDEO_SIGNALS, VIEW_SIGNALS

from .capture import CaptureNeeds, ProjectorCapture, VisionCapture, VisionHooks
from .clip_signals import CLIP_OPTIONS
from .decoder import DecoderSpec
from .plan import ForwardCall, Plan
from .records import ImageLayout
from .runtime import attach
from .spans import prompt_positions

__all__ = ["VLMAdapter", "Extension", "without_videos"]


def without_videos(reason: str) -> dict[str, str]:
    """``limitations`` entries of a family that takes no videos: why ``frames`` / ``frame_index`` are absent
    (quoted by the support check when a pipeline requires them)."""
    return {name: reason for name in sorted(VIDEO_SIGNALS)}


class Extension:
    """Extra hooks a family needs beyond the shared runtime (Qwen's M-RoPE stack positions, Qwen3's DeepStack).

    `install` is called once per attachment after the decoder machinery's hooks are registered; it returns the
    removable handles. `remove` drops any state. Raising in `install` aborts the attachment (nothing is left)."""

    def install(self, runtime: Any) -> list:
        return []

    def remove(self) -> None:
        return None


class _Placements:
    """Class-level ``placements``: the built-in placement names whose drops the adapter implements and whose
    requested signals it fills (derived from ``drop_kinds`` and ``on_request``; for the catalog and errors: support
    itself is keyed on drop kinds, ``framework.support``)."""

    def __get__(self, instance: Any, owner: type) -> frozenset[str]:
        return frozenset(
            name
            for name, kind in PLACEMENT_KINDS.items()
            if kind in owner.drop_kinds and PLACEMENT_REQUESTS.get(name, frozenset()) <= owner.on_request.get(kind, frozenset())
        )


class VLMAdapter:
    """Description of one model family (LLaVA-family defaults). Built per model instance: ``VLMAdapter(model)``.

    Class attributes:
        name, model_classes, description: registry metadata.
        drop_kinds: the drop kinds (``Drop.where``) the family implements.
        has_grid: whether ``Signals.grid`` / ``grids`` are provided (images are plain patch grids).
        has_frames: whether the family takes videos and fills ``Signals.frames`` / ``frame_index`` (every drop kind
            it implements but ``vision_layers``; layouts give them through ``records.with_frames``).
        has_views: whether image layouts say which view each token comes from (``ImageLayout.views``; AnyRes base
            image and crops) and ``Signals.view_index`` is filled (every drop kind but ``vision_layers``).
        has_cls: whether the vision tower has a CLS token (``cls_attention``; ``visual_keys`` at ``vision``).
        on_request: drop kind -> signals filled only for placements that request them in their ``provides``
            (LLaVA: CLIP-space signals at ``pre_llm`` drops, for ``pre_llm_clip``; needs ``clip_model``).
        supports_keep_cls: whether VisionZip's ``keep_cls`` can be honoured at ``vision``.
        limitations: drop kind, placement or signal name -> why it is not available (quoted in errors).
        options: keyword arguments of ``framework.prune`` that go to the runtime (not to ``compose``).
        pixel_kwargs: forward arguments whose presence means the call carries visual input.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    drop_kinds: ClassVar[frozenset[str]] = frozenset({"vision", "pre_llm", "layer"})
    has_grid: ClassVar[bool] = True
    has_frames: ClassVar[bool] = False
    has_views: ClassVar[bool] = False
    has_cls: ClassVar[bool] = True
    on_request: ClassVar[dict[str, frozenset[str]]] = {}
    supports_keep_cls: ClassVar[bool] = False
    limitations: ClassVar[dict[str, str]] = {}
    options: ClassVar[frozenset[str]] = CLIP_OPTIONS
    pixel_kwargs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    placements = _Placements()

    @classmethod
    def provides(cls, kind: str) -> frozenset[str]:
        """Signals filled at drops of ``kind`` ("vision", "pre_llm", "layer") for any placement. A built-in placement
        name is read as the kind of its drops plus the ``on_request`` signals that placement requests."""
        name, kind = kind, drop_kind(kind)
        if kind not in cls.drop_kinds:
            return frozenset()
        grid = GRID_SIGNALS if cls.has_grid else frozenset()
        cls_rows = CLS_SIGNALS if cls.has_cls else frozenset()
        if kind == "vision_layers":
            signals = VISION_SIGNALS  # the tower's own tokens, merged as they go (placement vision_layers)
        elif kind == "vision":
            signals = VISION_SIGNALS | grid | (cls_rows | {"visual_keys"} if cls.has_cls else frozenset())
        elif kind == "pre_llm":
            signals = EMBEDDING_SIGNALS | cls_rows | grid
        else:
            signals = EMBEDDING_SIGNALS | LAYER_SIGNALS | cls_rows | grid
        if cls.has_frames and kind != "vision_layers":
            signals = signals | VIDEO_SIGNALS
        if cls.has_views and kind != "vision_layers":
            signals = signals | VIEW_SIGNALS
        return signals | (cls.on_request.get(kind, frozenset()) & PLACEMENT_REQUESTS.get(name, frozenset()))

    #: The hook runtime that attaches a description (``framework.prune`` calls
    #: ``adapter.runtime(adapter(model), pipeline, budget, plan_factory=adapter.plan_factory, ...)``): data,
    #: not a method, and the same for every built-in family.
    runtime: ClassVar[Callable[..., Any]] = staticmethod(attach)
    #: Builds the per-forward drop plan from data (`vtprune.adapters.plan.Plan`); a family may name its own.
    plan_factory: ClassVar[Callable[..., Any]] = Plan

    # -- modules (LLaVA-family defaults) -----------------------------------------------------------------

    def __init__(self, model: nn.Module):
        self.model = model
        self.vlm = model.model if hasattr(model, "model") and hasattr(model.model, "language_model") else model
        self.config = self.vlm.config
        self.stack = self.vlm.language_model
        tower = self.vlm.vision_tower
        self.vision_entry: nn.Module = tower  # the module one vision run enters (its pre-hook opens a capture)
        self.tower = getattr(tower, "vision_model", tower)
        self.projector = self.vlm.multi_modal_projector

    def decoder_spec(self) -> DecoderSpec:
        return DecoderSpec.for_llama_like(self.stack)

    def project(self, values: Tensor) -> Tensor:
        """Vision-space token values (..., n, Dv) -> language-model tokens (..., n, D) through the projector."""
        dtype = next(self.projector.parameters()).dtype
        return self.projector(values.to(dtype))

    def patch_side(self) -> int:
        """Patches per side of one square crop of the vision tower (``image_size // patch_size`` of the vision
        config): a crop gives ``patch_side() ** 2`` patch tokens before any CLS token or pooling."""
        vision = self.config.vision_config
        return int(vision.image_size) // int(vision.patch_size)

    def final_norm(self) -> nn.Module:
        """The decoder's final norm (applied to in-LLM ``visual`` / ``prompt`` under the ``final_norm`` hint)."""
        norm = getattr(self.stack, "norm", None)
        if norm is None:
            raise ValueError(f"{type(self.stack).__name__} has no final `norm`: the final_norm hint (DART) is not available")
        return norm

    def extensions(self) -> tuple[Extension, ...]:
        """Extra hooks of the family, installed after the decoder machinery's (none by default)."""
        return ()

    def vision_hooks(self) -> VisionHooks:
        """How the vision side is captured (`ProjectorCapture`: projector input / output, CLS rows)."""
        return ProjectorCapture()

    # -- placeholders and images ----------------------------------------------------------------------------

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        """Ids of the placeholder tokens that are visual tokens (one `Signals` row per item they form)."""
        return (self.image_token_id,)

    def placeholder_kinds(self, embedding: nn.Module, bound: dict) -> Optional[Tensor]:
        """(B, L) long: the placeholder id at every visual placeholder, -1 elsewhere; from ``input_ids``, else from
        ``inputs_embeds`` compared with the placeholders' embeddings (``embedding``); None with neither."""
        import torch

        ids = self.placeholder_ids
        input_ids = bound.get("input_ids")
        if input_ids is not None:
            return torch.where(torch.isin(input_ids, torch.tensor(ids, device=input_ids.device)), input_ids, -1)
        embeds = bound.get("inputs_embeds")
        if embeds is None:
            return None
        table = embedding(torch.tensor(ids, device=embeds.device))  # (len(ids), D)
        kinds = torch.full(embeds.shape[:2], -1, dtype=torch.long, device=embeds.device)  # (B, L)
        for token, row in zip(ids, table):
            kinds = kinds.masked_fill((embeds == row).all(-1), token)
        return kinds

    def image_counts(self, call: ForwardCall, num_image_tokens: int) -> list[int]:
        """Placeholder tokens of each image of the forward, in order."""
        raise NotImplementedError

    def layouts(self, call: ForwardCall, counts: list[int], token_embeds: list[Tensor]) -> list[ImageLayout]:
        """One :class:`ImageLayout` per image, given its LM input embeddings (num_tokens, D)."""
        raise NotImplementedError

    def prompt_span(
        self, call: ForwardCall, image_mask: Tensor, mask2d: Tensor, prompt_stop: Optional[Sequence[int]]
    ) -> tuple[list[Tensor], Tensor]:
        """Per sample its prompt positions, and the (B,) query positions (LLaVA rule: `spans.prompt_positions`)."""
        return prompt_positions(image_mask, mask2d, call.input_ids, prompt_stop)

    # -- vision side -----------------------------------------------------------------------------------------

    def feature_layer(self, call: ForwardCall) -> int:
        layer = call.kwargs.get("vision_feature_layer")
        if layer is None:
            layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            layer = list(layer)[-1]  # several feature layers: CLS attention of the deepest listed one
        return int(layer)

    def strategy(self, call: ForwardCall) -> str:
        strategy = call.kwargs.get("vision_feature_select_strategy")
        return strategy if strategy is not None else self.config.vision_feature_select_strategy

    def cls_layer(self, call: ForwardCall) -> nn.Module:
        """The vision encoder layer producing the selected features (its CLS row is ``cls_attention``)."""
        if getattr(getattr(self.tower, "embeddings", None), "class_embedding", None) is None:
            raise ValueError(f"{type(self.tower).__name__} has no CLS token: cls_attention is not available for this model")
        layers = self.tower.encoder.layers
        index = self.feature_layer(call)
        number = len(layers) + index if index < 0 else max(index - 1, 0)
        return layers[number]

    def capture_needs(self, requires: frozenset, vision_drop: bool, keep_cls: bool) -> CaptureNeeds:
        """What the vision hooks must record for a pipeline requiring ``requires``."""
        cls = bool(requires & CLS_SIGNALS) or (vision_drop and "visual_keys" in requires)
        return CaptureNeeds(cls=cls, keys="visual_keys" in requires, cls_token=keep_cls)

    def vision_rows(
        self, capture: VisionCapture, layouts: list[ImageLayout], token_embeds: list[Tensor], per_crop: Tensor
    ) -> list[Tensor]:
        """Per image, a (num_tokens, C) tensor aligned with the image's LM tokens, from a per-crop vision-side
        tensor (crops, n, C) (``n`` = vision tokens after the CLS strategy). Tokens with no vision-side
        counterpart (newlines) get 0."""
        raise NotImplementedError(f"{self.name}: vision-side rows are not available")

    def vision_features(
        self,
        call: ForwardCall,
        capture: VisionCapture,
        layouts: list[ImageLayout],
        token_embeds: list[Tensor],
        device: Any,
    ) -> list[Tensor]:
        """Per image, the projector input aligned with its LLM tokens (num_tokens, Dv): ``Signals.visual`` at
        ``vision`` drops."""
        if capture.features is None:
            raise RuntimeError("vision placement: the vision tower did not run for this forward")
        return self.vision_rows(capture, layouts, token_embeds, capture.features)
