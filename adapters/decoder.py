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

Modules: ``decoder_spec`` (`DecoderSpec`, `DropState`, `Decision`, the `DropPlan` protocol), ``segments``
(`Segment`, `Session`, `compact_segment`), ``attention_rows`` (`recompute_attention_row`), ``decoding_steps``
(`Flight`, the state of a stack forward in flight, and `DecodingSteps`, the masks and position ids of the decoding
steps of a pruned cache); this module holds the hooks (`DecoderPruner`: attach / remove, the stack hooks and the
prefill's layer hooks) and re-exports the others.

Limitations: the cache must be a dynamic (growing) cache, empty at the pruned prefill; attention soft-capping,
static caches and sliding-window layers (unless ``spec.layer_kwargs`` rebuilds their masks: Gemma 3) are not handled.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import replace
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .attention_rows import recompute_attention_row, recompute_attention_rows
from .decoder_spec import (
    POSITIONS,
    Decision,
    DecoderSpec,
    DropPlan,
    DropState,
    default_make_mask,
    gather_seq,
)
from .decoding_steps import DecodingSteps, Flight, hidden_of, with_hidden
from .segments import Segment, Session, compact_segment

__all__ = [
    "DecoderSpec", "DropState", "Decision", "DropPlan", "Segment", "Session",
    "DecoderPruner", "gather_seq", "recompute_attention_row", "compact_segment", "default_make_mask",
]


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
        self._steps = DecodingSteps(spec, positions)
        self.sessions: "weakref.WeakKeyDictionary[Any, Session]" = weakref.WeakKeyDictionary()
        self.last_session: Optional[Session] = None
        self._flights: list[Optional[Flight]] = []
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
            return (), self._steps.start(session, cache, kwargs, self._input_mask, self._flights)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None and kwargs.get("input_ids") is not None and past == 0:
            embeds = self.spec.stack.get_input_embeddings()(kwargs["input_ids"])
            kwargs["inputs_embeds"], kwargs["input_ids"] = embeds, None  # used only if the plan prunes
        if embeds is None or past > 0:
            self._flights.append(None)
            return None
        batch, length = embeds.shape[:2]
        mask = self._input_mask(kwargs)
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
        flight = Flight(session=session, plan=plan, decoding=False, cache=cache)
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

    def _input_mask(self, kwargs: dict) -> Any:
        """The stack's ``attention_mask``, or the 2-D mask ``spec.stack_mask2d`` recovers for one built upstream."""
        mask = kwargs.get("attention_mask")
        if mask is not None and not isinstance(mask, Tensor) and self.spec.stack_mask2d is not None:
            return self.spec.stack_mask2d(kwargs)
        return mask

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
                return self._steps.layer(number, flight, args, kwargs)
            return self._prefill_layer(module, number, flight, args, kwargs)

        return hook

    def _prefill_layer(self, module, number, flight: Flight, args, kwargs):
        session, plan = flight.session, flight.plan
        if number == 0:
            flight.pe0 = kwargs.get("position_embeddings")
        hidden, positional = hidden_of(args, kwargs)
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
                if self.spec.layer_kwargs is not None and (flight.segment > 0 or session.decisions):
                    current = self.spec.layer_kwargs(number, hidden, {**kwargs, **current}, segment, flight.cache, True)
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
            prompt_attention = flight.prompt_scores.pop(number, None)
            state = DropState(number, hidden, segment.index, segment.valid, attention, keys, query_slot, prompt_attention)
            decision = plan.decide(number, state)
            if decision is not None and decision.changes(segment.valid):
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
        if self.spec.layer_kwargs is not None and (flight.segment > 0 or session.decisions):
            segment = session.segments[flight.segment]
            kwargs = self.spec.layer_kwargs(number, hidden, dict(kwargs), segment, flight.cache, True)
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
            if wants & {"prompt_attention", "plain_prompt_attention"}:  # plain: before RoPE, no causal mask
                slots = plan.prompt_query_slots(segment.index, segment.valid)  # (B, Q)
                flight.prompt_scores[number + 1] = recompute_attention_rows(
                    module, self.spec, hidden, kwargs.get("attention_mask"), kwargs.get("position_embeddings"), slots,
                    plain_keys=segment.valid if "plain_prompt_attention" in wants else None)
        if changed:
            return with_hidden(args, kwargs, hidden, positional)
        return None

    def _segment_overrides(self, flight: Flight, hidden: Tensor) -> dict:
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
