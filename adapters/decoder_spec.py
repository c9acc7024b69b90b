"""What differs between decoder stacks (:class:`DecoderSpec`) and the data a drop plan exchanges with the
decoder machinery (:class:`DropState`, :class:`Decision`, the :class:`DropPlan` protocol). See
``vtprune.adapters.decoder`` for the vocabulary and the timeline of a pruned prefill."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "POSITIONS",
    "DecoderSpec",
    "DropState",
    "Decision",
    "DropPlan",
    "gather_seq",
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
        stack_mask2d: for stacks whose ``attention_mask`` is built upstream in another form (Gemma 3: a dict of
            per-layer-type 4-D masks), ``stack kwargs -> the (B, L) 2-D mask it was built from`` (original
            coordinates; None: no padding). Unused while the stack receives a 2-D mask or None.
        layer_kwargs: optional ``(layer, hidden, kwargs, segment, cache, prefill) -> kwargs``: the last word on the
            kwargs of a layer whose slots were changed (a pruned prefill's changed segment, a later segment while
            decoding), after the generic overrides and before any scoring (per-layer-type masks / rotary
            embeddings, structure-aware masks such as Gemma 3's bidirectional image blocks). While decoding it is
            called for every layer of every segment of a pruned cache (segment 0 included, ``prefill`` False) with
            the segment's *decoding view*: a `Segment` whose slots go on with the tokens after the prefill (cached
            and in flight; ``index`` their original positions, ``mask2d`` the decoding 2-D mask), what the
            layer's keys are (a sliding-window cache layer holds the last of them).
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
    stack_mask2d: Optional[Callable[[dict], Optional[Tensor]]] = None
    layer_kwargs: Optional[Callable[..., dict]] = None

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
        prompt_attention: (B, H, Q, Ls) fp32 softmax attention rows of the plan's prompt query tokens
            (``plan.prompt_query_slots``) at the scoring layer, or None when not requested.
    """

    layer: int
    hidden: Tensor
    index: Tensor
    valid: Tensor
    attention: Optional[Tensor] = None
    keys: Optional[Tensor] = None
    query_slot: Optional[Tensor] = None
    prompt_attention: Optional[Tensor] = None


@dataclass(frozen=True)
class Decision:
    """A drop's outcome. ``keep``: (B, Ls) bool over current slots (fillers may be anything, they are dropped
    unless needed for alignment). ``values``: optional (B, Ls, D) replacement hidden states, used where
    ``replace`` (B, Ls) bool is True (merge-style methods)."""

    keep: Tensor
    values: Optional[Tensor] = None
    replace: Optional[Tensor] = None

    def changes(self, valid: Tensor) -> bool:
        """True when the decision changes the sequence: it drops a real slot (``valid`` (B, Ls) bool) or replaces
        some values (SparseVLM re-merging a single deleted token and moving it after the kept ones)."""
        dropped = not bool(self.keep[valid].all())
        return dropped or (self.values is not None and self.replace is not None and bool(self.replace[valid].any()))


class DropPlan(Protocol):
    """Per-forward decisions, returned by the controller at prefill.

    Attributes:
        layers: sorted drop layers; 0 means "at the decoder input" (pre-LLM / vision placements).
        query: (B,) original position of the token whose attention row is recomputed, or None.
    """

    layers: tuple[int, ...]
    query: Optional[Tensor]

    def wants(self, layer: int) -> frozenset[str]:
        """Subset of {"attention", "keys", "prompt_attention", "plain_prompt_attention"} the drop at ``layer`` needs
        from layer ``layer - 1`` ("prompt_attention" needs the optional ``prompt_query_slots(index, valid) -> (B, Q)
        long`` method; "plain_prompt_attention" is the same rows before RoPE, without the causal mask)."""

    def decide(self, layer: int, state: DropState) -> Optional[Decision]:
        """The drop at ``layer``; None keeps everything."""

    def finish(self, session: "Session") -> None:
        """Called once after the prefill forward (also when nothing was dropped)."""

    # Optional: ``score_layer(layer) -> int``, the decoder layer whose own ``input_norm`` / ``q_proj`` /
    # ``k_proj`` compute the attention row and keys of the drop at ``layer``: ``layer - 1`` (the default
    # when the plan has no such method: that layer's input, FastV) or ``layer`` itself (the hidden states
    # entering ``layer``, scored with ``layer``'s weights and the current segment's mask, PyramidDrop).
