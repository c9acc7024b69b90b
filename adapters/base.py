"""Shared runtime of the LLaVA-family adapters: image spans, prompt spans, `Signals`, drops, records.

An adapter *class* describes a model family (``name``, ``model_classes``, ``placements``,
``provides(placement)``) and ``attach(model, pipeline, budget, ...)`` returns an :class:`Attachment`:
the removable hooks on that one model instance plus the state of the last forward. Model-specific
parts are a handful of methods on the adapter (see :class:`VLMAdapter`); the decoder side is
``vtprune.adapters.decoder``.

Rows of `Signals` are images, in the order the model consumes them (row-major over the batch: all
images of sample 0, then sample 1, ...), which is also the order of ``pixel_values``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence

import torch
from torch import Tensor, nn

from vtprune.framework.errors import MissingSignalError, VtpruneError
from vtprune.framework.selection import Selection
from vtprune.framework.signals import Signals

from .clip_signals import CLIP_OPTIONS, ClipSignals
from .decoder import Decision, DecoderPruner, DecoderSpec, DropState, Session

__all__ = [
    "VLMAdapter",
    "Attachment",
    "DropRecord",
    "PruneResult",
    "ImageLayout",
    "prompt_positions",
    "clip_cls_rows",
]

EMBEDDING_SIGNALS = frozenset({"visual", "visual_mask", "prompt", "prompt_mask"})
LAYER_SIGNALS = frozenset({"attention", "visual_keys", "prompt_keys"})
VISION_SIGNALS = frozenset({"visual", "visual_mask"})
CLS_SIGNALS = frozenset({"cls_attention"})
CLIP_SIGNALS = frozenset({"clip_visual", "clip_text", "clip_text_mask"})

#: Stage hints (``Stage.adapter_hints``) the LLaVA-family adapters honour (docs/adapters.md).
HINT_FINAL_NORM = "final_norm"  # in-LLM visual / prompt = hidden states through the decoder's final norm (DART)
HINT_OWN_LAYER = "own_layer_scoring"  # layer(k) attention / keys from layer k's own weights on its input (PyramidDrop)


def pipeline_hints(pipeline: Any) -> frozenset[str]:
    """Union of the ``adapter_hints`` of the pipeline's stages (empty for duck-typed pipelines without stages)."""
    hints: set[str] = set()
    for stage in getattr(pipeline, "stages", ()) or ():
        hints |= set(getattr(stage, "adapter_hints", ()) or ())
    return frozenset(hints)


def check_support(adapter: "VLMAdapter", pipeline: Any) -> None:
    """Raise before any hook is installed when the adapter does not implement the pipeline's placement
    (`VtpruneError`) or cannot provide a signal it requires (`MissingSignalError`); both name the model class,
    the adapter, the placement, the reason (``adapter.limitations``) and what is supported."""
    model = type(adapter.model).__name__
    placement = getattr(pipeline.placement, "name", None)
    notes = adapter.limitations
    if placement not in adapter.placements:
        why = f" ({notes[placement]})" if placement in notes else ""
        raise VtpruneError(
            f"{model} (adapter {adapter.name!r}): placement {placement!r} is not implemented{why}; use one of "
            f"{sorted(adapter.placements)} (docs/adapters.md)"
        )
    provided = adapter.provides(placement)
    missing = sorted(set(pipeline.requires) - set(provided))
    if missing:
        why = "".join(f" ({name}: {notes[name]})" for name in missing if name in notes)
        raise MissingSignalError(
            f"{model} (adapter {adapter.name!r}) cannot provide {missing} at placement {placement!r}{why}; it "
            f"provides {sorted(provided)}"
        )


def pipeline_keeps_cls(pipeline: Any) -> bool:
    """Whether the pipeline asks for the vision CLS token to be kept (VisionZip: ``budget.visionzip(keep_cls=True)``)."""
    return bool(getattr(getattr(pipeline, "budget", None), "keep_cls", False))


# ----------------------------------------------------------------------------------------------------------
# Records exposed on the handle
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DropRecord:
    """One drop of the last pruned forward.

    Attributes:
        where: "vision", "pre_llm" or "layer".
        layer: decoder layer before which tokens were dropped (0 for vision / pre_llm).
        budgets: the budget of each image row at this drop.
        selection: `Selection` over image rows; ``indices`` are positions among the image's own tokens
            (0..num_tokens-1, the order in which the image's placeholders appear in the input).
        before: (R,) tokens of each image present before this drop.
    """

    where: str
    layer: int
    budgets: tuple
    selection: Selection
    before: Tensor
    patches: Optional[Selection] = None

    # ``patches``: only when the LLM tokens are not the image's own tokens (VisionZip ``keep_cls=True`` at
    # ``vision``): the pipeline's selection over the image's patches (image-token coordinates). ``selection``
    # then describes the image's placeholder slots the LLM receives: slot 0 holds the CLS token, the next
    # slots the dominant then the contextual patches, each group in ascending patch order (``critical`` is True
    # for CLS and dominant; ``values`` are the vision-space values before the projector).

    @property
    def counts(self) -> Tensor:
        return self.selection.counts


@dataclass(frozen=True)
class PruneResult:
    """What the last pruned forward kept (``handle.last_selection``).

    Attributes:
        drops: one :class:`DropRecord` per drop, in model order.
        image_sample: (R,) batch row of each image row.
        num_tokens: (R,) tokens of each image before any drop.
        image_positions: tuple of (num_tokens[r],) long: original sequence positions of each image's tokens.
        sequence_index: (B, L') original sequence position of every slot after the last drop (what the
            output logits / last hidden states are aligned with).
        sequence_mask: (B, L') bool, False for filler slots.
    """

    drops: tuple[DropRecord, ...]
    image_sample: Tensor
    num_tokens: Tensor
    image_positions: tuple[Tensor, ...]
    sequence_index: Tensor
    sequence_mask: Tensor

    @property
    def selection(self) -> Selection:
        """The final kept tokens per image (image-token coordinates); every token when nothing was dropped."""
        if self.drops:
            return self.drops[-1].selection
        width = int(self.num_tokens.max().item()) if self.num_tokens.numel() else 0
        arange = torch.arange(width).expand(len(self.num_tokens), -1)
        mask = arange < self.num_tokens.unsqueeze(1)
        return Selection(torch.where(mask, arange, 0), mask, torch.zeros_like(mask))

    @property
    def counts(self) -> Tensor:
        """(R,) tokens kept per image after the last drop."""
        return self.selection.counts

    @property
    def per_layer_counts(self) -> dict[int, Tensor]:
        """{drop layer: (R,) tokens kept per image from that layer on}."""
        return {record.layer: record.counts for record in self.drops}

    def kept_positions(self, image: int) -> Tensor:
        """Original sequence positions of the tokens image ``image`` keeps."""
        return self.image_positions[image][self.selection.row_indices(image).cpu()]


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageLayout:
    """The language-model tokens of one image.

    Attributes:
        num_tokens: placeholder tokens of the image in the input.
        newline: (num_tokens,) bool, True at image-newline tokens (LLaVA-NeXT); None if there are none.
        grid: (h, w) when the image's tokens are exactly a row-major patch grid; else None.
        kind: "image" or "video" (Qwen); which vision-tower run the item's features come from.
    """

    num_tokens: int
    newline: Optional[Tensor] = None
    grid: Optional[tuple[int, int]] = None
    kind: str = "image"


def _find_subsequence(row: Tensor, pattern: Sequence[int], start: int) -> int:
    """First index >= start where ``pattern`` occurs in ``row``; -1 if none."""
    if not pattern:
        return -1
    n = len(pattern)
    values = row.tolist()
    for i in range(start, len(values) - n + 1):
        if values[i : i + n] == list(pattern):
            return i
    return -1


def prompt_positions(
    image_mask: Tensor,
    real: Tensor,
    input_ids: Optional[Tensor] = None,
    prompt_stop: Optional[Sequence[int]] = None,
) -> tuple[list[Tensor], Tensor]:
    """The prompt span of every sample and its scoring query token.

    Rule (all LLaVA-family adapters): the prompt is the real (attention-mask 1) text tokens *after the
    sample's last image token*, up to the end of the input, or up to the first occurrence of
    ``prompt_stop`` (a token-id sequence marking the end of the user turn, e.g. the ids of
    ``" ASSISTANT:"``) after the last image. This skips the chat template's system prefix and the image
    placeholders. A sample with no text after its images uses all its real text tokens; a sample with no
    text at all has an empty prompt. The query token (whose attention row scores the image tokens at
    layer drops) is the last prompt token, or the last real token when the prompt is empty.

    Args:
        image_mask: (B, L) bool, True at image placeholder tokens.
        real: (B, L) bool, the 2-D attention mask.
        input_ids: (B, L) ids, needed for ``prompt_stop``.

    Returns:
        (list of (T_b,) long positions per sample, (B,) long query positions)
    """
    batch, length = image_mask.shape
    spans, queries = [], []
    arange = torch.arange(length, device=image_mask.device)
    for b in range(batch):
        text = real[b] & ~image_mask[b]
        images = image_mask[b].nonzero().flatten()
        start = int(images[-1].item()) + 1 if images.numel() else 0
        stop = length
        if prompt_stop and input_ids is not None:
            found = _find_subsequence(input_ids[b], prompt_stop, start)
            if found >= 0:
                stop = found
        span = text & (arange >= start) & (arange < stop)
        if not bool(span.any()):
            span = text
        positions = span.nonzero().flatten()
        spans.append(positions)
        if positions.numel():
            queries.append(positions[-1])
        else:
            reals = real[b].nonzero().flatten()
            queries.append(reals[-1] if reals.numel() else torch.tensor(length - 1, device=image_mask.device))
    return spans, torch.stack(queries).long()


def clip_cls_rows(layer: nn.Module, hidden: Tensor, want_keys: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """CLS-token attention row of a CLIP-style encoder layer (``layer_norm1``, ``self_attn.{q,k}_proj``,
    ``self_attn.scale``), recomputed from the layer input so it works under sdpa.

    Returns ``(attention (C, H, n) fp32, keys (C, n, H, d) or None)`` over all n tokens (CLS included).
    """
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden)
    crops, length, _ = normed.shape
    head_dim = attn.head_dim
    query = attn.q_proj(normed[:, :1]).view(crops, 1, -1, head_dim).transpose(1, 2)
    key = attn.k_proj(normed).view(crops, length, -1, head_dim).transpose(1, 2)
    scale = getattr(attn, "scale", None) or getattr(attn, "scaling")
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)[:, :, 0]
    return probs, (key.transpose(1, 2) if want_keys else None)


def _pad_rows(rows: list[Tensor], width: Optional[int] = None, value: float = 0.0) -> Tensor:
    width = max([r.shape[0] for r in rows] + [width or 0])
    out = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), value)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


# ----------------------------------------------------------------------------------------------------------
# Per-forward state
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Call:
    """One forward of the multimodal model in flight."""

    input_ids: Optional[Tensor]
    image_mask: Optional[Tensor]  # (B, L) bool
    has_images: bool
    kwargs: dict


@dataclass
class VisionCapture:
    """What the vision hooks saw during the last vision-tower run (``generate`` runs the tower before the
    forward, through ``get_image_features``, so this is not tied to a forward call).

    Attributes:
        cls: (crops, Hv, n_all) fp32 CLS attention rows (CLS column included).
        keys: (crops, n_all, Hv, dv) key states of the CLS layer.
        features: (crops, n, Dv) projector input (vision features after the CLS strategy).
        projected: (crops, n, D) projector output.
    """

    cls: Optional[Tensor] = None
    keys: Optional[Tensor] = None
    features: Optional[Tensor] = None
    projected: Optional[Tensor] = None
    cls_token: Optional[Tensor] = None  # (crops, Dv) CLS hidden state of the selected feature layer (keep_cls)
    runs: list = field(default_factory=list)  # adapter-specific records of several tower runs (Qwen: VisionRun)


# ----------------------------------------------------------------------------------------------------------
# Adapter base
# ----------------------------------------------------------------------------------------------------------


class VLMAdapter:
    """Base class of the LLaVA-family adapters. Subclasses set the class attributes and implement
    :meth:`layouts` and :meth:`vision_rows`; everything else is shared.

    Class attributes:
        name, model_classes, placements, description: registry metadata.
        has_grid: whether ``Signals.grid`` is provided (images are plain patch grids).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    placements: ClassVar[frozenset[str]] = frozenset({"vision", "pre_llm", "layer", "schedule"})
    has_grid: ClassVar[bool] = True
    #: Keyword arguments of ``framework.prune`` that go to :meth:`attach` (not to ``compose``).
    options: ClassVar[frozenset[str]] = CLIP_OPTIONS
    #: Whether VisionZip's ``keep_cls`` can be honoured at ``vision`` (one crop per image, CLS-free LLM tokens).
    supports_keep_cls: ClassVar[bool] = False
    #: Why a placement or signal is not available (placement or signal name -> reason), quoted in errors.
    limitations: ClassVar[dict[str, str]] = {}

    @classmethod
    def provides(cls, placement: str) -> frozenset[str]:
        """Signals filled at ``placement`` ("vision", "pre_llm", "layer", "schedule")."""
        grid = frozenset({"grid", "grids"}) if cls.has_grid else frozenset()
        if placement == "vision":
            return VISION_SIGNALS | CLS_SIGNALS | {"visual_keys"} | grid
        if placement == "pre_llm":
            return EMBEDDING_SIGNALS | CLS_SIGNALS | grid
        if placement == "pre_llm_clip" and "pre_llm_clip" in cls.placements:
            return EMBEDDING_SIGNALS | CLS_SIGNALS | CLIP_SIGNALS | grid
        if placement in ("layer", "schedule"):
            return EMBEDDING_SIGNALS | LAYER_SIGNALS | CLS_SIGNALS | grid
        raise ValueError(f"{cls.name} adapter: unknown placement {placement!r}; supported: {sorted(cls.placements)}")

    #: The runtime ``attach`` builds: `Attachment`, or a subclass for families with their own hooks.
    attachment_class: ClassVar[Optional[type]] = None

    @classmethod
    def attach(
        cls,
        model: nn.Module,
        pipeline: Any,
        budget: Any,
        *,
        positions: str = "keep",
        prompt_stop: Optional[Sequence[int]] = None,
        **options: Any,
    ) -> "Attachment":
        """Install the hooks on ``model``; see :class:`Attachment`.

        ``options`` are the names in ``cls.options`` (LLaVA family: ``clip_model`` / ``tokenizer`` /
        ``clip_tokenizer``, used by pipelines at ``pre_llm_clip`` only, see
        :class:`vtprune.adapters.clip_signals.ClipSignals`, and ignored otherwise).
        """
        unknown = sorted(set(options) - set(cls.options))
        if unknown:
            raise TypeError(f"adapter {cls.name!r}: unknown option(s) {unknown}; valid: {sorted(cls.options)}")
        runtime = cls.attachment_class or Attachment
        return runtime(cls(model), pipeline, budget, positions=positions, prompt_stop=prompt_stop, **options)

    # -- model access (LLaVA-family defaults) -------------------------------------------------------------

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
        """Vision-space token values (..., n, Dv) -> language-model tokens (..., n, D) through the projector
        (used for merged values chosen at the ``vision`` placement)."""
        dtype = next(self.projector.parameters()).dtype
        return self.projector(values.to(dtype))

    def final_norm(self) -> nn.Module:
        """The decoder's final norm (applied to in-LLM ``visual`` / ``prompt`` under the ``final_norm`` hint)."""
        norm = getattr(self.stack, "norm", None)
        if norm is None:
            raise ValueError(f"{type(self.stack).__name__} has no final `norm`: the final_norm hint (DART) is not available")
        return norm

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    #: Keyword arguments of the model's forward whose presence means the call carries visual input (besides
    #: ``mm_encoder_outputs``, the features ``generate`` pre-encodes).
    pixel_kwargs: ClassVar[tuple[str, ...]] = ("pixel_values",)

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        """Ids of the placeholder tokens that are visual tokens (one `Signals` row per item they form)."""
        return (self.image_token_id,)

    def feature_layer(self, call: _Call) -> int:
        layer = call.kwargs.get("vision_feature_layer")
        if layer is None:
            layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            layer = list(layer)[-1]  # several feature layers: CLS attention of the deepest listed one
        return int(layer)

    def strategy(self, call: _Call) -> str:
        strategy = call.kwargs.get("vision_feature_select_strategy")
        return strategy if strategy is not None else self.config.vision_feature_select_strategy

    def cls_layer(self, call: _Call) -> nn.Module:
        """The vision encoder layer producing the selected features (its CLS row is ``cls_attention``)."""
        if getattr(getattr(self.tower, "embeddings", None), "class_embedding", None) is None:
            raise ValueError(
                f"{type(self.tower).__name__} has no CLS token: cls_attention is not available for this model"
            )
        layers = self.tower.encoder.layers
        index = self.feature_layer(call)
        number = len(layers) + index if index < 0 else max(index - 1, 0)
        return layers[number]

    # -- model specific ---------------------------------------------------------------------------------

    def image_counts(self, call: _Call, num_image_tokens: int) -> list[int]:
        """Placeholder tokens of each image of the forward, in order."""
        raise NotImplementedError

    def layouts(self, call: _Call, counts: list[int], token_embeds: list[Tensor]) -> list[ImageLayout]:
        """One :class:`ImageLayout` per image, given its LM input embeddings (num_tokens, D)."""
        raise NotImplementedError

    def vision_rows(
        self, capture: VisionCapture, layouts: list[ImageLayout], token_embeds: list[Tensor], per_crop: Tensor
    ) -> list[Tensor]:
        """Per image, a (num_tokens, C) tensor aligned with the image's LM tokens, from a per-crop vision-side
        tensor (crops, n, C) (``n`` = vision tokens after the CLS strategy). Tokens with no vision-side
        counterpart (newlines) get 0."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------
# Attachment: the hooks and their state
# ----------------------------------------------------------------------------------------------------------


class Attachment:
    """Hooks of one pruning pipeline on one model instance.

    ``last_result`` is the :class:`PruneResult` of the last pruned prefill; ``budget`` may be changed
    between forwards (int, float or one value per image). ``remove()`` removes every hook.
    """

    def __init__(
        self,
        adapter: VLMAdapter,
        pipeline: Any,
        budget: Any,
        *,
        positions: str,
        prompt_stop=None,
        clip_model: Any = None,
        tokenizer: Any = None,
        clip_tokenizer: Any = None,
    ):
        check_support(adapter, pipeline)
        self.adapter = adapter
        self.pipeline = pipeline
        self.budget = budget
        self.positions = positions
        self.prompt_stop = list(prompt_stop) if prompt_stop is not None else None
        self.requires = frozenset(pipeline.requires)
        self.placement = pipeline.placement
        self.hints = pipeline_hints(pipeline)
        self.last_result: Optional[PruneResult] = None
        self._calls: list[Optional[_Call]] = []
        self._projecting = False
        self._handles: list = []
        probe = self.placement.drops(budget if not isinstance(budget, (list, tuple)) else budget[0])
        self._check_drops(probe)
        self.keep_cls = pipeline_keeps_cls(pipeline)
        if self.keep_cls:
            if not any(d.where == "vision" for d in probe):
                raise VtpruneError(
                    f"keep_cls=True is honoured at the vision placement only (this pipeline drops at "
                    f"{sorted({d.where for d in probe})}); use placement vision or keep_cls=False"
                )
            if not adapter.supports_keep_cls:
                raise VtpruneError(
                    f"adapter {adapter.name!r} cannot keep the CLS token (keep_cls=True): its images are several crops "
                    "with newline tokens; use keep_cls=False"
                )
        self.clip: Optional[ClipSignals] = None
        if self.requires & CLIP_SIGNALS:
            if clip_model is None:
                raise MissingSignalError(
                    f"the pipeline needs {sorted(self.requires & CLIP_SIGNALS)} (CLIP-space signals, placement "
                    f"{getattr(self.placement, 'name', '?')!r}) but no CLIP model was given: pass "
                    "framework.prune(..., clip_model=<CLIPModel or path of the vision tower's CLIP checkpoint>, "
                    "tokenizer=<the VLM's tokenizer or processor>)"
                )
            self.clip = ClipSignals(clip_model, tokenizer, adapter.tower, clip_tokenizer=clip_tokenizer)
        self.decoder = DecoderPruner(adapter.decoder_spec(), self._controller, positions=positions)
        try:
            self._install(adapter, probe)
        except BaseException:
            self.remove()  # never leave a partial attachment behind
            raise

    def _install(self, adapter: VLMAdapter, probe: Sequence[Any]) -> None:
        vlm = adapter.vlm
        self._vlm_params = [n for n in inspect.signature(vlm.forward).parameters if n not in ("self", "kwargs")]
        self._handles.append(vlm.register_forward_pre_hook(self._vlm_pre, with_kwargs=True))
        self._handles.append(vlm.register_forward_hook(self._vlm_post, with_kwargs=True, always_call=True))
        self._handles.extend(self.decoder.attach())
        vision_drop = any(d.where == "vision" for d in probe)
        self._need_cls = bool(self.requires & {"cls_attention"}) or (vision_drop and "visual_keys" in self.requires)
        self._vision: Optional[VisionCapture] = None
        self._need_vision = self._need_cls or vision_drop or self.clip is not None
        if self._need_vision:
            self._handles.append(adapter.vision_entry.register_forward_pre_hook(self._tower_hook, with_kwargs=True))
            self._handles.append(adapter.projector.register_forward_pre_hook(self._projector_pre))
            self._handles.append(adapter.projector.register_forward_hook(self._projector_post))
        if self._need_cls:
            layer = self.adapter.cls_layer(_Call(None, None, False, {}))  # raises early when the tower has no CLS
            self._handles.append(layer.register_forward_pre_hook(self._cls_hook, with_kwargs=True))
        if self.keep_cls:
            layer = self.adapter.cls_layer(_Call(None, None, False, {}))
            self._handles.append(layer.register_forward_hook(self._cls_token_hook))

    # -- bookkeeping ------------------------------------------------------------------------------------

    def _check_drops(self, drops: Sequence[Any]) -> None:
        spec_layers = len(self.adapter.decoder_spec().layers)
        at_input = [d for d in drops if d.where in ("vision", "pre_llm")]
        if len(at_input) > 1:
            raise ValueError("at most one vision / pre_llm drop per pipeline")
        for drop in drops:
            if drop.where not in ("vision", "pre_llm", "layer"):
                raise ValueError(f"unknown drop point {drop.where!r}")
            if drop.where == "layer" and not 1 <= int(drop.layer) < spec_layers:
                raise ValueError(
                    f"layer drop before layer {drop.layer}: the language model has {spec_layers} layers "
                    f"(valid k: 1..{spec_layers - 1})"
                )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.decoder.remove()
        self._calls.clear()

    # -- vlm hooks --------------------------------------------------------------------------------------

    def _vlm_pre(self, module, args, kwargs):
        bound = dict(kwargs)
        for name, value in zip(self._vlm_params, args):
            bound.setdefault(name, value)
        visual = any(bound.get(key) is not None for key in self.adapter.pixel_kwargs) or bool(
            bound.get("mm_encoder_outputs")
        )
        kinds = self._placeholders(module, bound) if visual else None
        self._calls.append(self._new_call(bound, kinds))
        return None

    def _placeholders(self, module, bound: dict) -> Optional[Tensor]:
        """(B, L) long: the placeholder id (``adapter.placeholder_ids``) at every visual placeholder, -1
        elsewhere; read from ``input_ids``, else from ``inputs_embeds`` by comparing them with the placeholders'
        embeddings; None when the call has neither."""
        ids = self.adapter.placeholder_ids
        input_ids = bound.get("input_ids")
        if input_ids is not None:
            return torch.where(torch.isin(input_ids, torch.tensor(ids, device=input_ids.device)), input_ids, -1)
        embeds = bound.get("inputs_embeds")
        if embeds is None:
            return None
        table = module.get_input_embeddings()(torch.tensor(ids, device=embeds.device))
        kinds = torch.full(embeds.shape[:2], -1, dtype=torch.long, device=embeds.device)
        for token, row in zip(ids, table):
            kinds = kinds.masked_fill((embeds == row).all(-1), token)
        return kinds

    def _new_call(self, bound: dict, kinds: Optional[Tensor]) -> _Call:
        """The `_Call` of a forward, given its placeholders (`_placeholders`; None: no visual input found)."""
        image_mask = kinds >= 0 if kinds is not None else None
        return _Call(bound.get("input_ids"), image_mask, image_mask is not None, bound)

    def _vlm_post(self, module, args, kwargs, output):
        if self._calls:
            self._calls.pop()
        return None

    def _current(self) -> Optional[_Call]:
        return self._calls[-1] if self._calls else None

    def _tower_hook(self, module, args, kwargs):
        if not self._projecting:
            self._vision = VisionCapture()
        return None

    def _cls_hook(self, module, args, kwargs):
        if self._vision is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        want_keys = "visual_keys" in self.requires
        self._vision.cls, self._vision.keys = clip_cls_rows(module, hidden, want_keys=want_keys)
        return None

    def _cls_token_hook(self, module, args, output):
        if self._vision is not None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            self._vision.cls_token = hidden[:, 0]
        return None

    def _projector_pre(self, module, args):
        if self._vision is not None and not self._projecting and args:
            self._vision.features = args[0]
        return None

    def _projector_post(self, module, args, output):
        if self._vision is not None and not self._projecting:
            self._vision.projected = output
        return None

    def _take_vision(self) -> VisionCapture:
        capture, self._vision = self._vision, None
        return capture if capture is not None else VisionCapture()

    # -- controller -------------------------------------------------------------------------------------

    #: The drop plan `_controller` builds for a pruned prefill: `_Plan` (assigned after its definition below), or
    #: a subclass for families with their own prompt span or vision capture (like `VLMAdapter.attachment_class`).
    plan_class: ClassVar[type]

    def _controller(self, embeds: Tensor, mask2d: Tensor, positions: Tensor) -> Optional["_Plan"]:
        call = self._current()
        if call is None or not call.has_images or call.image_mask is None:
            return None
        image_mask = call.image_mask.to(embeds.device)
        if image_mask.shape != mask2d.shape or not bool(image_mask.any()):
            return None
        return self.plan_class(self, call, embeds, image_mask, mask2d)


class _Plan:
    """The drop plan of one prefill (implements ``decoder.DropPlan``)."""

    def __init__(self, owner: Attachment, call: _Call, embeds: Tensor, image_mask: Tensor, mask2d: Tensor):
        self.owner = owner
        self.adapter = owner.adapter
        self.call = call
        self.device = embeds.device
        batch, length = image_mask.shape
        self.length = length
        self.capture = owner._take_vision() if owner._need_vision else VisionCapture()
        counts = self.adapter.image_counts(call, int(image_mask.sum().item()))
        flat = image_mask.nonzero()  # row-major (sample, position)
        if sum(counts) != flat.shape[0]:
            raise ValueError(
                f"{self.adapter.name}: {flat.shape[0]} image tokens in the input but the images need {sum(counts)}"
            )
        self.image_sample, self.image_positions = [], []
        offset = 0
        for count in counts:
            chunk = flat[offset : offset + count]
            offset += count
            if not bool((chunk[:, 0] == chunk[0, 0]).all()):
                raise ValueError("an image's placeholder tokens span two samples")
            self.image_sample.append(int(chunk[0, 0]))
            self.image_positions.append(chunk[:, 1])
        self.num_images = len(counts)
        self.token_embeds = [embeds[b, p.to(embeds.device)] for b, p in zip(self.image_sample, self.image_positions)]
        self.layouts = self.adapter.layouts(call, counts, self.token_embeds)
        prompt_stop = owner.prompt_stop
        self.prompts, self.query = prompt_positions(image_mask, mask2d, call.input_ids, prompt_stop)
        self.query = self.query.to(self.device)
        budget = owner.budget
        if isinstance(budget, (list, tuple)) or (isinstance(budget, Tensor) and budget.dim() == 1):
            budgets = [b.item() if isinstance(b, Tensor) else b for b in budget]
            if len(budgets) != self.num_images:
                raise ValueError(f"budget has {len(budgets)} entries for {self.num_images} images in this forward")
        else:
            budgets = [budget] * self.num_images
        self.drops_per_image = [owner.placement.drops(b) for b in budgets]
        structure = {tuple((d.where, d.layer) for d in drops) for drops in self.drops_per_image}
        if len(structure) != 1:
            raise ValueError("per-image budgets must give the same drop points")
        self.drops = self.drops_per_image[0] if self.drops_per_image else ()
        owner._check_drops(self.drops)
        self.layers = tuple(0 if d.where in ("vision", "pre_llm") else int(d.layer) for d in self.drops)
        self.records: list[DropRecord] = []
        self.requires = owner.requires
        # per-image present tokens (image-token coordinates), updated at each drop
        self.present = [torch.ones(c, dtype=torch.bool, device=self.device) for c in counts]
        self._cls_rows = None
        self._vkey_rows = None

    # -- DropPlan API -----------------------------------------------------------------------------------

    def score_layer(self, layer: int) -> int:
        """Layer whose own q/k score the drop at ``layer``: ``layer`` under the ``own_layer_scoring`` hint
        (PyramidDrop), else ``layer - 1`` (FastV)."""
        return layer if HINT_OWN_LAYER in self.owner.hints else layer - 1

    def wants(self, layer: int) -> frozenset[str]:
        wanted = set()
        if "attention" in self.requires:
            wanted.add("attention")
        if self.requires & {"visual_keys", "prompt_keys"}:
            wanted.add("keys")
        return frozenset(wanted)

    def decide(self, layer: int, state: DropState) -> Optional[Decision]:
        number = self.layers.index(layer)
        drop = self.drops[number]
        budgets = [drops[number].budget for drops in self.drops_per_image]
        if drop.where == "vision":
            signals, columns, slots = self._vision_signals(state)
        else:
            signals, columns, slots = self._llm_signals(state, drop)
        selection = self.owner.pipeline.select(signals, budgets if len(set(budgets)) > 1 else budgets[0])
        if drop.where == "vision" and self.owner.keep_cls:
            return self._apply_with_cls(drop, layer, budgets, selection, signals, columns, slots, state)
        return self._apply(drop, layer, budgets, selection, columns, slots, state)

    def finish(self, session: Session) -> None:
        final = session.final
        self.owner.last_result = PruneResult(
            drops=tuple(self.records),
            image_sample=torch.tensor(self.image_sample, dtype=torch.long),
            num_tokens=torch.tensor([layout.num_tokens for layout in self.layouts], dtype=torch.long),
            image_positions=tuple(p.cpu() for p in self.image_positions),
            sequence_index=final.index.cpu(),
            sequence_mask=final.valid.cpu(),
        )

    # -- signals ----------------------------------------------------------------------------------------

    def _slot_map(self, state: DropState) -> Tensor:
        batch, width = state.index.shape
        slot_of = torch.full((batch, self.length + 1), -1, dtype=torch.long, device=self.device)
        target = torch.where(state.valid, state.index, torch.full_like(state.index, self.length))
        slot_of.scatter_(1, target, torch.arange(width, device=self.device).expand(batch, -1))
        return slot_of[:, : self.length]

    def _rows(self, state: DropState) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: present token ids (image coords) and their current slots."""
        slot_of = self._slot_map(state)
        columns, slots = [], []
        for r in range(self.num_images):
            s = slot_of[self.image_sample[r], self.image_positions[r].to(self.device)]
            tokens = (s >= 0).nonzero().flatten()
            columns.append(tokens)
            slots.append(s[tokens])
        return columns, slots

    def _cls(self) -> Optional[list[Tensor]]:
        if self._cls_rows is None and self.capture.cls is not None:
            per_crop = self._strip_cls(self.capture.cls.transpose(1, 2))  # (crops, n, H)
            self._cls_rows = [row.float().t().to(self.device) for row in self._vision_rows(per_crop)]
        return self._cls_rows

    def _vision_keys(self) -> Optional[list[Tensor]]:
        if self._vkey_rows is None and self.capture.keys is not None:
            keys = self._strip_cls(self.capture.keys)  # (crops, n, H, d)
            crops, n, heads, dim = keys.shape
            rows = self._vision_rows(keys.reshape(crops, n, heads * dim))
            self._vkey_rows = [row.float().view(row.shape[0], heads, dim) for row in rows]
        return self._vkey_rows

    def _vision_rows(self, per_crop: Tensor) -> list[Tensor]:
        return self.adapter.vision_rows(self.capture, self.layouts, self.token_embeds, per_crop)

    def _strip_cls(self, per_crop: Tensor) -> Tensor:
        return per_crop[:, 1:] if self.adapter.strategy(self.call) == "default" else per_crop

    def _row_grids(self, columns: list[Tensor]) -> list[Optional[tuple[int, int]]]:
        """Per image, its (h, w) token grid while all its tokens are present (a drop breaks the grid)."""
        return [
            layout.grid if c.numel() == layout.num_tokens else None for c, layout in zip(columns, self.layouts)
        ]

    def _common(self, columns: list[Tensor], fields: dict) -> None:
        if "cls_attention" in self.requires:
            rows = self._cls()
            if rows is not None:
                fields["cls_attention"] = _pad_rows([rows[r][:, c].t() for r, c in enumerate(columns)]).transpose(1, 2)
        grids = self._row_grids(columns)
        if grids and len(set(grids)) == 1 and grids[0] is not None:
            fields["grid"] = grids[0]  # one grid for every row
        elif any(g is not None for g in grids):  # rows differ: per-row grids, (0, 0) = none
            fields["grids"] = torch.tensor([g if g is not None else (0, 0) for g in grids], dtype=torch.long)

    def _llm_signals(self, state: DropState, drop: Any):
        columns, slots = self._rows(state)
        hidden = state.hidden
        if drop.where == "layer" and HINT_FINAL_NORM in self.owner.hints:
            with torch.no_grad():
                hidden = self.adapter.final_norm()(hidden)  # DART: similarities on model.norm(hidden states)
        hidden = hidden.float()
        fields: dict[str, Any] = {}
        fields["visual"] = _pad_rows([hidden[self.image_sample[r], slots[r]] for r in range(self.num_images)])
        fields["visual_mask"] = _pad_rows([torch.ones(len(s), dtype=torch.bool, device=self.device) for s in slots], value=False)
        width = fields["visual"].shape[1]
        slot_of = self._slot_map(state)
        prompt_slots = [slot_of[b, self.prompts[b].to(self.device)] for b in range(state.hidden.shape[0])]
        if any(bool((p < 0).any()) for p in prompt_slots):
            raise RuntimeError("a prompt token was dropped")
        if True:  # prompt hidden states are cheap; stages that do not read them ignore them
            rows = [hidden[self.image_sample[r], prompt_slots[self.image_sample[r]]] for r in range(self.num_images)]
            if max(r.shape[0] for r in rows) > 0:
                fields["prompt"] = _pad_rows(rows)
                fields["prompt_mask"] = _pad_rows(
                    [torch.ones(r.shape[0], dtype=torch.bool, device=self.device) for r in rows], value=False
                )
        if state.attention is not None:
            rows = [state.attention[self.image_sample[r]][:, slots[r]].t() for r in range(self.num_images)]
            fields["attention"] = _pad_rows(rows, width).transpose(1, 2)
        if state.keys is not None:
            keys = state.keys.float()
            fields["visual_keys"] = _pad_rows([keys[self.image_sample[r], slots[r]] for r in range(self.num_images)], width)
            if "prompt" in fields:
                fields["prompt_keys"] = _pad_rows(
                    [keys[self.image_sample[r], prompt_slots[self.image_sample[r]]] for r in range(self.num_images)]
                )
        if drop.where == "pre_llm" and self.owner.clip is not None:
            self._clip_fields(columns, fields)
        self._common(columns, fields)
        return Signals(**fields), columns, slots

    def _clip_fields(self, columns: list[Tensor], fields: dict) -> None:
        """``clip_visual`` / ``clip_text`` / ``clip_text_mask`` (CDPruner; see ``adapters/clip_signals.py``)."""
        clip = self.owner.clip
        features = self.capture.features
        if features is None:
            raise RuntimeError("pre_llm_clip: the vision tower did not run for this forward")
        if self.call.input_ids is None:
            raise ValueError("pre_llm_clip needs input_ids to recover the prompt text (inputs_embeds was given)")
        per_crop = clip.image_embeds(features)  # (crops, n, C) fp32
        rows = self._vision_rows(per_crop)
        fields["clip_visual"] = _pad_rows([row[c].float() for row, c in zip(rows, columns)]).to(self.device)
        cache: dict = {}
        texts = []
        for r in range(self.num_images):
            b = self.image_sample[r]
            ids = self.call.input_ids[b, self.prompts[b].to(self.call.input_ids.device)]
            texts.append(clip.prompt_embeds(ids, cache).to(self.device))
        fields["clip_text"] = _pad_rows(texts)
        fields["clip_text_mask"] = _pad_rows(
            [torch.ones(t.shape[0], dtype=torch.bool, device=self.device) for t in texts], value=False
        )

    def _vision_feature_rows(self) -> list[Tensor]:
        """Per image, the projector input aligned with its LLM tokens (num_tokens, Dv)."""
        features = self.capture.features
        if features is None:
            raise RuntimeError("vision placement: the vision tower did not run for this forward")
        return self._vision_rows(features)

    def _vision_signals(self, state: DropState):
        columns, slots = self._rows(state)
        rows = self._vision_feature_rows()
        newline = [layout.newline for layout in self.layouts]
        fields: dict[str, Any] = {
            "visual": _pad_rows([row.float() for row in rows]),
            "visual_mask": _pad_rows(
                [
                    (~n if n is not None else torch.ones(row.shape[0], dtype=torch.bool, device=row.device))
                    for row, n in zip(rows, newline)
                ],
                value=False,
            ).to(self.device),
        }
        fields["visual"] = fields["visual"].to(self.device)
        if "visual_keys" in self.requires:
            keys = self._vision_keys()
            if keys is not None:
                fields["visual_keys"] = _pad_rows(keys).to(self.device)
        self._common(columns, fields)
        return Signals(**fields), columns, slots

    # -- decision ---------------------------------------------------------------------------------------

    def _apply_with_cls(self, drop, layer, budgets, selection: Selection, signals: Signals, columns, slots, state) -> Decision:
        """VisionZip ``keep_cls=True`` at ``vision``: each image gives the LLM its CLS token followed by the kept
        patches in the official order [CLS, dominant ascending, contextual ascending], written (through the
        projector) into the first ``count + 1`` placeholder slots of the image; the other slots are dropped. An
        image keeping all its patches has no free slot for CLS and is left untouched."""
        if self.adapter.strategy(self.call) != "default":
            raise ValueError("keep_cls=True needs vision_feature_select_strategy='default' (CLS not among the patches)")
        if not isinstance(self.adapter.feature_layer(self.call), int) or self.capture.cls_token is None:
            raise RuntimeError("keep_cls=True: the CLS hidden state of the feature layer was not captured")
        if self.capture.cls_token.shape[0] != self.num_images:
            raise ValueError(f"keep_cls=True: {self.capture.cls_token.shape[0]} crops for {self.num_images} images")
        keep = torch.ones_like(state.valid)
        replace = torch.zeros_like(state.valid)
        values = None
        patches = selection.gather(signals.visual)  # (R, K, Dv): merged values where set
        rows_idx, rows_mask, rows_crit, rows_vals = [], [], [], []
        for r in range(self.num_images):
            b = self.image_sample[r]
            n = columns[r].numel()
            idx = selection.indices[r][selection.mask[r]]
            crit = selection.critical[r][selection.mask[r]]
            count = idx.numel()
            if count + 1 > n:  # nothing dropped: no slot for CLS, the image stays as it is
                rows_idx.append(columns[r])
                rows_crit.append(crit)
                rows_vals.append(signals.visual[r, :n])
                continue
            order = torch.cat([(crit).nonzero().flatten(), (~crit).nonzero().flatten()])  # dominant, then contextual
            sequence = torch.cat(
                [self.capture.cls_token[r : r + 1].float().to(self.device), patches[r][selection.mask[r]][order]]
            )  # (count + 1, Dv)
            self.owner._projecting = True
            try:
                with torch.no_grad():
                    projected = self.adapter.project(sequence.unsqueeze(0))[0]
            finally:
                self.owner._projecting = False
            if values is None:
                values = torch.zeros(*state.valid.shape, projected.shape[-1], dtype=state.hidden.dtype, device=self.device)
            target = slots[r][: count + 1]
            keep[b, slots[r][count + 1 :]] = False
            values[b, target] = projected.to(values.dtype)
            replace[b, target] = True
            rows_idx.append(columns[r][: count + 1])
            rows_crit.append(torch.cat([crit.new_ones(1), crit[order]]))
            rows_vals.append(sequence)
            new_present = torch.zeros_like(self.present[r])
            new_present[columns[r][: count + 1]] = True
            self.present[r] = new_present
        width = max(t.numel() for t in rows_idx)
        record = Selection(
            indices=_pad_rows([t.cpu() for t in rows_idx], width),
            mask=_pad_rows([torch.ones(t.numel(), dtype=torch.bool) for t in rows_idx], width, value=False),
            critical=_pad_rows([t.cpu() for t in rows_crit], width, value=False),
            values=_pad_rows([v.detach().float().cpu() for v in rows_vals], width),
        )
        patch_record = Selection(
            indices=torch.stack([columns[r][selection.indices[r]] for r in range(self.num_images)]).cpu()
            if self.num_images
            else selection.indices.cpu(),
            mask=selection.mask.cpu(),
            critical=selection.critical.cpu(),
            values=None if selection.values is None else selection.values.detach().cpu(),
        )
        before = torch.tensor([c.numel() for c in columns], dtype=torch.long)
        self.records.append(DropRecord(drop.where, layer, tuple(budgets), record, before, patches=patch_record))
        return Decision(keep=keep, values=values, replace=replace if values is not None else None)

    def _apply(self, drop, layer, budgets, selection: Selection, columns, slots, state: DropState) -> Decision:
        keep = torch.ones_like(state.valid)
        values = None
        replace = None
        kept = selection.kept_mask(max([c.numel() for c in columns] + [selection.indices.shape[1]]))
        if selection.values is not None:
            vals = selection.values
            if drop.where == "vision":
                self.owner._projecting = True
                try:
                    vals = self.adapter.project(vals)
                finally:
                    self.owner._projecting = False
            values = torch.zeros(*state.valid.shape, vals.shape[-1], dtype=state.hidden.dtype, device=self.device)
            replace = torch.zeros_like(state.valid)
        mapped, masks, crit = [], [], []
        for r in range(self.num_images):
            b = self.image_sample[r]
            n = columns[r].numel()
            row_kept = kept[r, :n]
            keep[b, slots[r][~row_kept]] = False
            idx = selection.indices[r][selection.mask[r]]
            if values is not None:
                values[b, slots[r][idx]] = vals[r][selection.mask[r]].to(values.dtype)
                replace[b, slots[r][idx]] = True
            mapped.append(columns[r][idx])
            new_present = torch.zeros_like(self.present[r])
            new_present[columns[r][idx]] = True
            self.present[r] = new_present
        width = selection.indices.shape[1]
        img_indices = torch.zeros(self.num_images, width, dtype=torch.long, device=self.device)
        for r, m in enumerate(mapped):
            img_indices[r, : m.numel()] = m
        record = Selection(
            indices=img_indices.cpu(),
            mask=selection.mask.cpu(),
            critical=selection.critical.cpu(),
            values=None if selection.values is None else selection.values.detach().cpu(),
        )
        before = torch.tensor([c.numel() for c in columns], dtype=torch.long)
        self.records.append(DropRecord(drop.where, layer, tuple(budgets), record, before))
        return Decision(keep=keep, values=values, replace=replace)


Attachment.plan_class = _Plan
