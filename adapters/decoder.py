"""Model-agnostic machinery to drop tokens inside a Hugging Face decoder stack, with removable hooks.

This module knows nothing about images. It drops *sequence slots* from a decoder stack (``LlamaModel``,
``Qwen2Model``, the text model of Qwen2-VL, ...) whose layers are called as::

    layer(hidden_states, attention_mask=..., position_embeddings=..., position_ids=..., cache=..., **kw)

and whose stack forward takes ``inputs_embeds``, ``attention_mask`` (2-D), ``position_ids`` and ``cache``.
A model-specific *controller* (see :class:`DropPlan`) decides which slots to keep; this module applies the
decision consistently to hidden states, attention masks, position ids / rotary embeddings and the KV cache,
during prefill and during every later decoding step (``model.generate``).

Vocabulary
----------
original sequence
    The (B, L) sequence the decoder stack receives at prefill, left padding included. "Original position"
    means an index 0..L-1 into it.
segment
    A run of decoder layers ``[start, next_start)`` that see the same token set (:class:`Segment`). Segment 0
    is what the stack itself receives (the whole sequence, or what remains after a drop at the stack input);
    every drop before a layer ``k >= 1`` starts a new segment. Layers of segment ``s`` keep a KV cache holding
    exactly the slots of segment ``s`` (plus generated tokens), so layers < k of a ``layer(k)`` drop keep the
    full sequence, as in FastV.
slot
    A column of a segment. ``Segment.index[b, j]`` is the original position held by slot ``j`` of row ``b``.
    Rows may keep different numbers of tokens: shorter rows get *filler* slots on the left (``valid`` False),
    masked out of attention exactly like left padding, so the last slot of every row is its last real token.
positions
    ``"keep"``: a kept token keeps the position id it had in the original sequence (RoPE sees gaps);
    ``"compact"``: it is renumbered as if the dropped tokens had never been there (original position minus the
    number of tokens dropped before it). Decoding continues accordingly: a new token gets its original position
    (``keep``) or its original position minus the number of tokens the segment dropped (``compact``).

Timeline of one pruned prefill
------------------------------
1. Stack forward pre-hook: ``controller(inputs_embeds, attention_mask, position_ids)`` returns a
   :class:`DropPlan` (or None: the forward runs untouched). Missing 2-D masks / position ids are materialised
   exactly as the stack would (ones / ``arange + past``). If the plan drops at layer 0 (``0 in plan.layers``),
   ``plan.decide(0, state)`` runs on the input embeddings and the stack is given the compacted
   ``inputs_embeds``, 2-D mask and position ids (the stack builds its own causal mask and rotary embeddings).
2. Pre-hook of layer ``k - 1`` for every drop layer ``k >= 1``: if the plan wants them, the attention row of
   the plan's query token (``plan.query``, one original position per row) is recomputed from that layer's
   ``input_layernorm``, ``q_proj``/``k_proj`` (+ ``q_norm``/``k_norm`` when present), rotary embedding and the
   layer's own attention mask, with the eager formula (softmax in fp32), so it works under ``sdpa``/flash
   without switching to eager. The post-RoPE key states of all slots come with it.
3. Pre-hook of layer ``k``: ``plan.decide(k, state)`` sees the hidden states output by layer ``k - 1`` and the
   recomputed row; the kept slots are gathered and layers ``>= k`` get the gathered hidden states, a causal
   mask rebuilt for the new slots (``create_causal_mask`` with ``layer_idx=k``, so the mask is sized against
   that layer's cache), gathered (keep) or recomputed (compact) rotary embeddings and position ids.
4. Stack forward hook: the session (segments, shifts) is stored in a ``WeakKeyDictionary`` keyed by the
   returned cache object; ``plan.finish(session)`` is called.

Decoding steps (the stack is called with a cache that has a session): the stack pre-hook rewrites the 2-D
mask given in *original* coordinates (what ``generate`` maintains: original length + generated tokens) and
the position ids for segment 0; layer pre-hooks do the same for later segments. Nothing is ever stored on the
model; all state lives on the :class:`DecoderPruner` object and dies with it.

Customising for another decoder (e.g. M-RoPE models)
---------------------------------------------------
Everything model-specific sits in :class:`DecoderSpec`: how to compute rotary embeddings from position ids
(``rope``), how to apply them (``apply_rope``), where the sequence axis of position ids / embeddings is
(last axis of position ids, axis -2 of cos/sin: both hold for ``(B, L)`` and ``(3, B, L)`` layouts), how to
shift position ids for ``compact`` (``shift_positions``), which position ids the layers receive
(``layer_position_ids``), and how to build a causal mask (``make_mask``).

Limitations: the cache must be a dynamic (growing) cache and empty at the pruned prefill; sliding-window
layers, attention soft-capping and static caches are not handled.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "DecoderSpec",
    "DropState",
    "Decision",
    "DropPlan",
    "Segment",
    "Session",
    "DecoderPruner",
    "gather_seq",
    "recompute_attention_row",
    "compact_segment",
    "default_make_mask",
]

POSITIONS = ("keep", "compact")


# ----------------------------------------------------------------------------------------------------------
# Small tensor helpers
# ----------------------------------------------------------------------------------------------------------


def gather_seq(x: Tensor, index: Tensor, seq_dim: int) -> Tensor:
    """Gather along a sequence axis with a per-row index.

    Args:
        x: tensor whose batch axis is the axis right before ``seq_dim`` (``(B, L, ...)`` with ``seq_dim=1``,
            cos/sin ``(B, L, d)`` or ``(3, B, L, d)`` with ``seq_dim=-2``, position ids ``(B, L)`` or
            ``(3, B, L)`` with ``seq_dim=-1``). A batch axis of size 1 is broadcast.
        index: (B, Ls) long.
        seq_dim: the sequence axis of ``x``.

    Returns:
        ``x`` with its sequence axis replaced by ``Ls`` slots: ``out[..., b, j, ...] = x[..., b, index[b, j], ...]``.
    """
    seq_dim = seq_dim % x.dim()
    bdim = seq_dim - 1
    if bdim < 0:
        raise ValueError("gather_seq needs a batch axis right before the sequence axis")
    batch, slots = index.shape
    if x.shape[bdim] != batch:
        shape = list(x.shape)
        shape[bdim] = batch
        x = x.expand(*shape)
    view = [1] * x.dim()
    view[bdim], view[seq_dim] = batch, slots
    target = list(x.shape)
    target[seq_dim] = slots
    return x.gather(seq_dim, index.to(x.device).view(view).expand(target))


def _to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), torch.finfo(dtype).min)
    return mask.to(dtype)


# ----------------------------------------------------------------------------------------------------------
# Spec: what differs between decoders
# ----------------------------------------------------------------------------------------------------------


def default_make_mask(config: Any) -> Callable[..., Any]:
    """``make_mask(hidden, mask2d, cache, layer_idx)`` built on ``transformers.masking_utils.create_causal_mask``."""
    from transformers.masking_utils import create_causal_mask

    def make_mask(hidden: Tensor, mask2d: Tensor, cache: Any, layer_idx: int) -> Any:
        return create_causal_mask(
            config=config,
            inputs_embeds=hidden,
            attention_mask=mask2d,
            cache=cache,
            position_ids=None,  # never trigger packed-sequence detection on gapped (keep) position ids
            layer_idx=layer_idx if cache is not None else None,
        )

    return make_mask


def _default_shift(position_ids: Tensor, delta: Tensor) -> Tensor:
    # delta: (B, Ls) or (B, 1); position ids (..., B, Ls)
    return position_ids - delta.to(position_ids.dtype)


@dataclass
class DecoderSpec:
    """How to drive one decoder stack. Build it with :meth:`for_llama_like` for Llama/Mistral/Qwen2-style stacks.

    Attributes:
        stack: the module whose forward receives ``inputs_embeds``/``attention_mask``/``position_ids``/``cache``
            (e.g. ``LlamaModel``). Its forward pre-hook and forward hook are used.
        layers: the decoder layers, in call order.
        config: the stack's config (``_attn_implementation`` decides the mask format).
        rope: ``(hidden_states, position_ids) -> position_embeddings`` (e.g. ``stack.rotary_emb``); position ids
            are in the stack-level layout (``(B, L)``, or ``(3, B, L)`` for M-RoPE).
        apply_rope: ``(q, k, cos, sin) -> (q, k)`` for tensors ``(B, H, L, d)`` (the modeling file's
            ``apply_rotary_pos_emb``; M-RoPE models pass a closure over their section sizes).
        attention: ``layer -> attention module`` with ``q_proj``, ``k_proj``, ``head_dim``, ``scaling`` and
            optional ``q_norm``/``k_norm``.
        input_norm: ``layer -> the norm applied before attention``.
        layer_position_ids: ``stack-level position ids -> the position_ids kwarg the layers receive``.
        shift_positions: ``(position_ids, delta (B, Ls)) -> position_ids`` for ``compact``.
        make_mask: ``(hidden, mask2d (B, KV) bool, cache, layer_idx) -> attention mask for the layers``.
        default_positions: ``(inputs_embeds, past_length) -> stack-level position ids`` used when the caller gives
            none (what the stack would compute itself).
        pe_seq_dim: sequence axis of each tensor in ``position_embeddings`` (-2 for cos/sin ``(..., B, L, d)``).
    """

    stack: nn.Module
    layers: Sequence[nn.Module]
    config: Any
    rope: Callable[[Tensor, Tensor], Any]
    apply_rope: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
    attention: Callable[[nn.Module], nn.Module] = lambda layer: layer.self_attn
    input_norm: Callable[[nn.Module], nn.Module] = lambda layer: layer.input_layernorm
    layer_position_ids: Callable[[Tensor], Optional[Tensor]] = lambda position_ids: position_ids
    shift_positions: Callable[[Tensor, Tensor], Tensor] = _default_shift
    make_mask: Optional[Callable[..., Any]] = None
    default_positions: Optional[Callable[[Tensor, int], Tensor]] = None
    pe_seq_dim: int = -2

    def __post_init__(self) -> None:
        if self.make_mask is None:
            self.make_mask = default_make_mask(self.config)
        if self.default_positions is None:
            self.default_positions = lambda embeds, past: (
                torch.arange(embeds.shape[1], device=embeds.device) + past
            ).unsqueeze(0).expand(embeds.shape[0], -1)

    @classmethod
    def for_llama_like(cls, stack: nn.Module, **overrides: Any) -> "DecoderSpec":
        """Spec for stacks shaped like ``LlamaModel`` (``layers``, ``rotary_emb``, ``config``), using the
        ``apply_rotary_pos_emb`` of the stack's own modeling module."""
        module = inspect.getmodule(type(stack))
        apply_rope = getattr(module, "apply_rotary_pos_emb", None)
        if apply_rope is None:
            raise TypeError(f"{type(stack).__name__}: no apply_rotary_pos_emb in {module.__name__}; pass apply_rope")
        values = dict(
            stack=stack,
            layers=list(stack.layers),
            config=stack.config,
            rope=stack.rotary_emb,
            apply_rope=apply_rope,
        )
        values.update(overrides)
        return cls(**values)


# ----------------------------------------------------------------------------------------------------------
# Data exchanged with the controller
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DropState:
    """What a drop sees. All per-slot tensors are in the coordinates of the current segment.

    Attributes:
        layer: the drop layer (0 = decoder input).
        hidden: (B, Ls, D) the hidden states entering ``layer`` (input embeddings for layer 0).
        index: (B, Ls) original position of each slot.
        valid: (B, Ls) bool, False for filler slots.
        attention: (B, H, Ls) fp32 softmax attention of the query token at layer ``layer - 1`` (or at ``layer``
            itself when the plan's optional ``score_layer(layer)`` says so) (None at layer 0 or when not requested).
        keys: (B, Ls, Hk, dk) post-RoPE key states of that same layer (None when not requested).
        query_slot: (B,) slot of the query token, or None.
    """

    layer: int
    hidden: Tensor
    index: Tensor
    valid: Tensor
    attention: Optional[Tensor] = None
    keys: Optional[Tensor] = None
    query_slot: Optional[Tensor] = None


@dataclass(frozen=True)
class Decision:
    """A drop's outcome. ``keep``: (B, Ls) bool over current slots (fillers may be anything, they are dropped
    unless needed for alignment). ``values``: optional (B, Ls, D) replacement hidden states, used where
    ``replace`` (B, Ls) bool is True (merge-style methods)."""

    keep: Tensor
    values: Optional[Tensor] = None
    replace: Optional[Tensor] = None


class DropPlan(Protocol):
    """Per-forward decisions, returned by the controller at prefill.

    Attributes:
        layers: sorted drop layers; 0 means "at the decoder input" (pre-LLM / vision placements).
        query: (B,) original position of the token whose attention row is recomputed, or None.
    """

    layers: tuple[int, ...]
    query: Optional[Tensor]

    def wants(self, layer: int) -> frozenset[str]:
        """Subset of {"attention", "keys"} the drop at ``layer`` needs from layer ``layer - 1``."""

    def decide(self, layer: int, state: DropState) -> Optional[Decision]:
        """The drop at ``layer``; None keeps everything."""

    def finish(self, session: "Session") -> None:
        """Called once after the prefill forward (also when nothing was dropped)."""

    # Optional: ``score_layer(layer) -> int``, the decoder layer whose own ``input_norm`` / ``q_proj`` /
    # ``k_proj`` compute the attention row and keys of the drop at ``layer``: ``layer - 1`` (the default
    # when the plan has no such method: that layer's input, FastV) or ``layer`` itself (the hidden states
    # entering ``layer``, scored with ``layer``'s weights and the current segment's mask, PyramidDrop).


# ----------------------------------------------------------------------------------------------------------
# Segments and sessions
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Segment:
    """The token set seen by decoder layers ``[start, next segment's start)``.

    Attributes:
        start: first layer of the segment.
        index: (B, Ls) original positions of the slots.
        rel: (B, Ls) slot of segment 0 holding the same token (to gather tensors the stack computed).
        valid: (B, Ls) bool, False for fillers.
        mask2d: (B, Ls) bool prefill 2-D attention mask of the slots (original mask, False at fillers).
        positions: stack-level position ids of the slots at prefill (``(..., B, Ls)``).
        shift: (B,) long, subtracted from original position ids of new tokens (0 for ``keep``).
        dropped: (B,) long, real tokens dropped so far (for logging).
    """

    start: int
    index: Tensor
    rel: Tensor
    valid: Tensor
    mask2d: Tensor
    positions: Tensor
    shift: Tensor
    dropped: Tensor

    @property
    def length(self) -> int:
        return int(self.index.shape[1])


@dataclass
class Session:
    """Everything needed to continue decoding after a pruned prefill."""

    length: int  # original prefill length L
    positions_mode: str
    original_positions: Tensor  # stack-level (..., B, L)
    segments: list[Segment]
    decisions: list[tuple[int, Decision]] = field(default_factory=list)

    def segment_of(self, layer: int) -> int:
        current = 0
        for number, segment in enumerate(self.segments):
            if segment.start <= layer:
                current = number
        return current

    @property
    def final(self) -> Segment:
        return self.segments[-1]


def compact_segment(
    segment: Segment,
    keep: Tensor,
    *,
    start: int,
    original_positions: Tensor,
    length: int,
    positions_mode: str,
    spec: DecoderSpec,
) -> tuple[Segment, Tensor, Tensor]:
    """Apply a keep mask (B, Ls) to ``segment``. Fillers of the current segment are always dropped; kept slots
    are right-aligned (new fillers on the left).

    Returns ``(new_segment, source, new_valid)``: ``source`` (B, Ln) slots of ``segment`` that fill the new slots
    (fillers point at the row's first kept slot), ``new_valid`` (B, Ln) bool.
    """
    keep = keep & segment.valid
    batch, width = keep.shape
    counts = keep.sum(dim=1)
    new_len = max(int(counts.max().item()) if batch else 0, 1)
    arange = torch.arange(width, device=keep.device).expand(batch, -1)
    order = torch.where(keep, arange, arange + width).argsort(dim=1)[:, :new_len]  # kept slots first, ascending
    pad = (new_len - counts).unsqueeze(1)  # (B, 1)
    src = torch.arange(new_len, device=keep.device).unsqueeze(0) - pad  # (B, Ln)
    new_valid = src >= 0
    source = order.gather(1, src.clamp(min=0))
    index = segment.index.gather(1, source)
    rel = segment.rel.gather(1, source)
    mask2d = segment.mask2d.gather(1, source) & new_valid
    # tokens of the original sequence still present
    present = torch.zeros(batch, length + 1, dtype=torch.bool, device=keep.device)
    present.scatter_(1, torch.where(new_valid, index, torch.full_like(index, length)), True)
    dropped_mask = ~present[:, :length]
    dropped = dropped_mask.sum(dim=1)
    positions = gather_seq(original_positions, index, -1)
    if positions_mode == "compact":
        before = dropped_mask.long().cumsum(dim=1).gather(1, index)  # dropped tokens before each slot
        positions = spec.shift_positions(positions, before)
        shift = dropped
    else:
        shift = torch.zeros_like(dropped)
    new = Segment(
        start=start,
        index=index,
        rel=rel,
        valid=new_valid,
        mask2d=mask2d,
        positions=positions,
        shift=shift,
        dropped=dropped,
    )
    return new, source, new_valid


# ----------------------------------------------------------------------------------------------------------
# Attention row recomputation
# ----------------------------------------------------------------------------------------------------------


def recompute_attention_row(
    layer: nn.Module,
    spec: DecoderSpec,
    hidden: Tensor,
    attention_mask: Any,
    position_embeddings: tuple[Tensor, Tensor],
    query_slot: Tensor,
    *,
    want_keys: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """The softmax attention row of one query token per batch row, as eager attention computes it.

    Args:
        layer: the decoder layer whose attention is recomputed.
        hidden: (B, L, D) the layer's input hidden states (before ``input_norm``).
        attention_mask: what the layer received (4-D bool or additive, or None = plain causal).
        position_embeddings: ``(cos, sin)`` the layer received.
        query_slot: (B,) slot of the query token in each row.
        want_keys: also return the post-RoPE keys.

    Returns:
        ``attention`` (B, H, L) fp32 (softmax in fp32, not cast back), ``keys`` (B, L, Hk, dk) or None.
    """
    attn = spec.attention(layer)
    normed = spec.input_norm(layer)(hidden)
    batch, length, _ = normed.shape
    head_dim = attn.head_dim
    row = gather_seq(normed, query_slot.view(batch, 1), 1)  # (B, 1, D)
    query = attn.q_proj(row).view(batch, 1, -1, head_dim)
    key = attn.k_proj(normed).view(batch, length, -1, head_dim)
    if getattr(attn, "q_norm", None) is not None:
        query = attn.q_norm(query)
    if getattr(attn, "k_norm", None) is not None:
        key = attn.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)  # (B, H, 1, d), (B, Hk, L, d)
    cos, sin = position_embeddings
    cos_q = gather_seq(cos, query_slot.view(batch, 1), spec.pe_seq_dim)
    sin_q = gather_seq(sin, query_slot.view(batch, 1), spec.pe_seq_dim)
    query = spec.apply_rope(query, query, cos_q, sin_q)[0]
    key = spec.apply_rope(key, key, cos, sin)[1]
    groups = query.shape[1] // key.shape[1]
    expanded = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    scores = torch.matmul(query, expanded.transpose(2, 3)) * attn.scaling  # (B, H, 1, L)
    if attention_mask is None:
        allowed = torch.arange(length, device=hidden.device).unsqueeze(0) <= query_slot.view(batch, 1)
        scores = scores + _to_additive(allowed.view(batch, 1, 1, length), scores.dtype)
    else:
        mask = attention_mask
        if not isinstance(mask, Tensor):
            raise TypeError(f"cannot recompute attention under a {type(mask).__name__} mask")
        if mask.shape[-2] == 1:
            mask_row = mask
        else:
            mask = mask.expand(batch, *mask.shape[1:])
            rows = torch.arange(batch, device=mask.device)
            mask_row = mask[rows, :, query_slot.to(mask.device), :].unsqueeze(2)  # (B, 1 or H, 1, KV)
        scores = scores + _to_additive(mask_row[..., -length:], scores.dtype)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)[:, :, 0]  # (B, H, L)
    keys = key.transpose(1, 2) if want_keys else None
    return probs, keys


# ----------------------------------------------------------------------------------------------------------
# The hooks
# ----------------------------------------------------------------------------------------------------------


def _score_layer(plan: Any, layer: int) -> int:
    """The layer whose weights score the drop at ``layer`` (``plan.score_layer`` if defined, else ``layer - 1``)."""
    chooser = getattr(plan, "score_layer", None)
    if chooser is None:
        return layer - 1
    chosen = int(chooser(layer))
    if chosen not in (layer - 1, layer):
        raise ValueError(f"score_layer({layer}) must be {layer - 1} or {layer}, got {chosen}")
    return chosen


@dataclass
class _Flight:
    """State of the stack forward in flight."""

    session: Session
    plan: Optional[DropPlan]
    decoding: bool
    cache: Any
    segment: int = 0  # current segment number (prefill)
    pe0: Any = None  # position embeddings of segment 0 (as the stack computed them)
    orig_mask: Optional[Tensor] = None  # decoding: 2-D mask in original coordinates, or None
    orig_positions: Optional[Tensor] = None  # decoding: stack-level original position ids of the new tokens
    per_segment: dict = field(default_factory=dict)  # segment number -> dict of layer kwargs overrides
    scores: dict = field(default_factory=dict)  # drop layer -> (attention, keys)


class DecoderPruner:
    """Installs the hooks on one decoder stack and keeps per-cache sessions.

    Args:
        spec: the :class:`DecoderSpec`.
        controller: ``(inputs_embeds, mask2d (B, L) bool, position_ids) -> DropPlan | None``, called at the
            prefill of every stack forward whose cache is empty or None.
        positions: ``"keep"`` or ``"compact"``.

    ``attach()`` returns the list of torch ``RemovableHandle``; ``remove()`` removes them. ``sessions`` maps
    cache objects to their :class:`Session`; ``last_session`` is the session of the last pruned prefill.
    """

    def __init__(self, spec: DecoderSpec, controller: Callable[..., Optional[DropPlan]], positions: str = "keep"):
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        self.spec = spec
        self.controller = controller
        self.positions = positions
        self.sessions: "weakref.WeakKeyDictionary[Any, Session]" = weakref.WeakKeyDictionary()
        self.last_session: Optional[Session] = None
        self._flights: list[Optional[_Flight]] = []
        self._handles: list = []
        self._stack_params = list(inspect.signature(spec.stack.forward).parameters)

    # -- attach / remove --------------------------------------------------------------------------------

    def attach(self) -> list:
        stack = self.spec.stack
        self._handles.append(stack.register_forward_pre_hook(self._stack_pre, with_kwargs=True))
        self._handles.append(stack.register_forward_hook(self._stack_post, with_kwargs=True, always_call=True))
        for number, layer in enumerate(self.spec.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(number), with_kwargs=True))
        return list(self._handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._flights.clear()

    @property
    def prefill_session(self) -> Optional[Session]:
        """The `Session` of the pruned prefill running now (from the stack pre-hook to the stack forward hook;
        its ``segments`` grow as drops happen), else None (no stack forward in flight, a forward left alone, or
        a decoding step). Lets an adapter keep per-token side inputs of the stack aligned with the current
        slots (Qwen3-VL's DeepStack features)."""
        flight = self._flights[-1] if self._flights else None
        return flight.session if flight is not None and not flight.decoding else None

    # -- stack hooks ------------------------------------------------------------------------------------

    def _bind(self, args: tuple, kwargs: dict) -> dict:
        bound = dict(kwargs)
        names = [n for n in self._stack_params if n not in ("self", "args", "kwargs")]
        for name, value in zip(names, args):
            bound[name] = value
        return bound

    @staticmethod
    def _cache_of(kwargs: dict) -> Any:
        cache = kwargs.get("cache")
        return cache if cache is not None else kwargs.get("past_key_values")

    def _stack_pre(self, module: nn.Module, args: tuple, kwargs: dict):
        kwargs = self._bind(args, kwargs)
        cache = self._cache_of(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        session = self.sessions.get(cache) if cache is not None else None
        if session is not None and past > 0:
            return (), self._start_decoding(session, cache, kwargs)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None and kwargs.get("input_ids") is not None and past == 0:
            embeds = self.spec.stack.get_input_embeddings()(kwargs["input_ids"])
            kwargs["inputs_embeds"], kwargs["input_ids"] = embeds, None  # used only if the plan prunes
        if embeds is None or past > 0:
            self._flights.append(None)
            return None
        batch, length = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            self._flights.append(None)  # custom 4-D masks: leave the forward alone
            return None
        mask2d = (
            torch.ones(batch, length, dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        )
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = self.spec.default_positions(embeds, 0)
        positions = positions.expand(*positions.shape[:-2], batch, length) if positions.shape[-2] == 1 else positions
        plan = self.controller(embeds, mask2d, positions)
        if plan is None:
            self._flights.append(None)
            return None
        arange = torch.arange(length, device=embeds.device).unsqueeze(0).expand(batch, -1)
        zero = torch.zeros(batch, dtype=torch.long, device=embeds.device)
        segment = Segment(0, arange, arange, torch.ones_like(mask2d), mask2d, positions, zero, zero)
        session = Session(length, self.positions, positions, [segment])
        flight = _Flight(session=session, plan=plan, decoding=False, cache=cache)
        self._flights.append(flight)
        if 0 in plan.layers:
            query_slot = plan.query if plan.query is not None else None
            state = DropState(0, embeds, arange, segment.valid, query_slot=query_slot)
            decision = plan.decide(0, state)
            if decision is not None and not bool(decision.keep[segment.valid].all()):
                new, source, new_valid = self._compact(session, segment, decision, start=0)
                session.decisions.append((0, decision))
                segment0 = replace(new, rel=torch.arange(new.length, device=embeds.device).expand(batch, -1))
                session.segments[0] = segment0
                kwargs["inputs_embeds"] = self._gather_hidden(embeds, source, decision, new_valid)
                kwargs["attention_mask"] = segment0.mask2d.to(mask.dtype if mask is not None else torch.long)
                kwargs["position_ids"] = segment0.positions
        return (), kwargs

    def _start_decoding(self, session: Session, cache: Any, kwargs: dict) -> dict:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = self.spec.stack.get_input_embeddings()(kwargs["input_ids"])
            kwargs["inputs_embeds"], kwargs["input_ids"] = embeds, None
        batch, q_len = embeds.shape[:2]
        seg0 = session.segments[0]
        past0 = cache.get_seq_length(seg0.start)
        seen = past0 - seg0.length  # tokens processed after the prefill
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = self.spec.default_positions(embeds, session.length + seen)
        if positions.shape[-2] == 1 and batch > 1:
            positions = positions.expand(*positions.shape[:-2], batch, positions.shape[-1])
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError("a pruned cache can only continue with a 2-D attention mask (or None)")
        flight = _Flight(session=session, plan=None, decoding=True, cache=cache)
        flight.orig_mask = mask.bool() if mask is not None else None
        flight.orig_positions = positions
        self._flights.append(flight)
        kwargs["attention_mask"] = self._decode_mask(session, seg0, flight, batch, past0 + q_len).to(
            mask.dtype if mask is not None else torch.long
        )
        kwargs["position_ids"] = self._decode_positions(seg0, positions)
        return kwargs

    def _decode_mask(self, session: Session, segment: Segment, flight: _Flight, batch: int, total: int) -> Tensor:
        tail_len = total - segment.length
        if flight.orig_mask is not None:
            orig = flight.orig_mask
            if orig.shape[1] != session.length + tail_len:
                raise ValueError(
                    f"attention_mask has {orig.shape[1]} columns; expected the original length "
                    f"{session.length} plus {tail_len} tokens after the pruned prefill"
                )
            tail = orig[:, session.length :]
        else:
            tail = torch.ones(batch, tail_len, dtype=torch.bool, device=segment.mask2d.device)
        return torch.cat([segment.mask2d, tail.to(segment.mask2d.device)], dim=1)

    def _decode_positions(self, segment: Segment, positions: Tensor) -> Tensor:
        if self.positions == "keep" or not bool(segment.shift.any()):
            return positions
        return self.spec.shift_positions(positions, segment.shift.view(-1, 1))

    def _stack_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        flight = self._flights.pop() if self._flights else None
        if flight is None or flight.decoding:
            return None
        cache = None
        if output is not None:
            cache = getattr(output, "cache", None)
            if cache is None:
                cache = getattr(output, "past_key_values", None)
        if cache is None:
            cache = flight.cache
        if cache is not None and len(flight.session.segments) > 0 and flight.session.decisions:
            self.sessions[cache] = flight.session
        self.last_session = flight.session
        if flight.plan is not None:
            flight.plan.finish(flight.session)
        return None

    # -- layer hooks ------------------------------------------------------------------------------------

    def _layer_hook(self, number: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if not self._flights or self._flights[-1] is None:
                return None
            flight = self._flights[-1]
            if number >= len(self.spec.layers):
                return None
            if flight.decoding:
                return self._decode_layer(number, flight, args, kwargs)
            return self._prefill_layer(module, number, flight, args, kwargs)

        return hook

    @staticmethod
    def _hidden_of(args: tuple, kwargs: dict) -> tuple[Tensor, bool]:
        if args:
            return args[0], True
        return kwargs["hidden_states"], False

    @staticmethod
    def _with_hidden(args: tuple, kwargs: dict, hidden: Tensor, positional: bool) -> tuple[tuple, dict]:
        if positional:
            return (hidden, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _prefill_layer(self, module, number, flight: _Flight, args, kwargs):
        session, plan = flight.session, flight.plan
        if number == 0:
            flight.pe0 = kwargs.get("position_embeddings")
        hidden, positional = self._hidden_of(args, kwargs)
        changed = False
        # a drop before this layer
        if number > 0 and number in plan.layers:
            segment = session.segments[flight.segment]
            attention, keys = flight.scores.pop(number, (None, None))
            query_slot = self._query_slot(plan, segment)
            wants = plan.wants(number)
            if _score_layer(plan, number) == number and wants & {"attention", "keys"} and query_slot is not None:
                # scored with this layer's own weights on its (pre-drop) input, under the current segment's mask
                current = flight.per_segment.get(flight.segment, kwargs) if flight.segment > 0 else kwargs
                attention, keys = recompute_attention_row(
                    module,
                    self.spec,
                    hidden,
                    current.get("attention_mask"),
                    current.get("position_embeddings"),
                    query_slot,
                    want_keys="keys" in wants,
                )
                attention = attention if "attention" in wants else None
            state = DropState(number, hidden, segment.index, segment.valid, attention, keys, query_slot)
            decision = plan.decide(number, state)
            if decision is not None and not bool(decision.keep[segment.valid].all()):
                new, source, new_valid = self._compact(session, segment, decision, start=number)
                session.decisions.append((number, decision))
                session.segments.append(new)
                flight.segment = len(session.segments) - 1
                hidden = self._gather_hidden(hidden, source, decision, new_valid)
                changed = True
        if flight.segment > 0:
            overrides = self._segment_overrides(flight, hidden)
            kwargs = dict(kwargs)
            kwargs.update(overrides)
            changed = True
        # scoring inputs for a drop after this layer
        if (number + 1) in plan.layers and _score_layer(plan, number + 1) == number:
            wants = plan.wants(number + 1)
            segment = session.segments[flight.segment]
            query_slot = self._query_slot(plan, segment)
            if wants & {"attention", "keys"} and query_slot is not None:
                attention, keys = recompute_attention_row(
                    module,
                    self.spec,
                    hidden,
                    kwargs.get("attention_mask"),
                    kwargs.get("position_embeddings"),
                    query_slot,
                    want_keys="keys" in wants,
                )
                flight.scores[number + 1] = (attention if "attention" in wants else None, keys)
        if changed:
            return self._with_hidden(args, kwargs, hidden, positional)
        return None

    def _decode_layer(self, number, flight: _Flight, args, kwargs):
        session = flight.session
        seg_no = session.segment_of(number)
        if seg_no == 0:
            return None
        if seg_no not in flight.per_segment:
            segment = session.segments[seg_no]
            hidden, _ = self._hidden_of(args, kwargs)
            batch, q_len = hidden.shape[:2]
            past = flight.cache.get_seq_length(segment.start)
            mask2d = self._decode_mask(session, segment, flight, batch, past + q_len)
            overrides = {"attention_mask": self.spec.make_mask(hidden, mask2d, flight.cache, segment.start)}
            if self.positions == "compact":
                positions = self._decode_positions(segment, flight.orig_positions)
                overrides["position_embeddings"] = self.spec.rope(hidden, positions)
                overrides["position_ids"] = self.spec.layer_position_ids(positions)
            flight.per_segment[seg_no] = overrides
        kwargs = dict(kwargs)
        kwargs.update(flight.per_segment[seg_no])
        return args, kwargs

    def _segment_overrides(self, flight: _Flight, hidden: Tensor) -> dict:
        seg_no = flight.segment
        if seg_no in flight.per_segment:
            return flight.per_segment[seg_no]
        segment = flight.session.segments[seg_no]
        overrides: dict = {
            "attention_mask": self.spec.make_mask(hidden, segment.mask2d, flight.cache, segment.start),
            "position_ids": self.spec.layer_position_ids(segment.positions),
        }
        if self.positions == "keep" and flight.pe0 is not None:
            overrides["position_embeddings"] = tuple(gather_seq(t, segment.rel, self.spec.pe_seq_dim) for t in flight.pe0)
        else:
            overrides["position_embeddings"] = self.spec.rope(hidden, segment.positions)
        flight.per_segment[seg_no] = overrides
        return overrides

    # -- helpers ----------------------------------------------------------------------------------------

    @staticmethod
    def _query_slot(plan: DropPlan, segment: Segment) -> Optional[Tensor]:
        if plan.query is None:
            return None
        hits = (segment.index == plan.query.view(-1, 1).to(segment.index.device)) & segment.valid
        if not bool(hits.any(dim=1).all()):
            raise RuntimeError("the scoring query token was dropped")
        return hits.long().argmax(dim=1)

    def _compact(self, session: Session, segment: Segment, decision: Decision, start: int):
        return compact_segment(
            segment,
            decision.keep.to(segment.valid.device),
            start=start,
            original_positions=session.original_positions,
            length=session.length,
            positions_mode=self.positions,
            spec=self.spec,
        )

    @staticmethod
    def _gather_hidden(hidden: Tensor, source: Tensor, decision: Decision, new_valid: Tensor) -> Tensor:
        out = gather_seq(hidden, source, 1)
        if decision.values is not None:
            replace_mask = decision.replace if decision.replace is not None else decision.keep
            values = gather_seq(decision.values.to(hidden.dtype), source, 1)
            use = (gather_seq(replace_mask, source, 1) & new_valid).unsqueeze(-1)
            out = torch.where(use, values, out)
        return out
