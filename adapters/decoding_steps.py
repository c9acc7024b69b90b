"""The decoding steps after a pruned prefill: the half of ``decoder.DecoderPruner`` that runs when the stack is
called with a cache that holds a `Session` (see ``vtprune.adapters.decoder`` for the vocabulary and the timeline).

The stack receives its 2-D mask and position ids in *original* coordinates (what ``generate`` maintains: the
original length plus the generated tokens); `DecodingSteps.start` rewrites them for segment 0, and
`DecodingSteps.layer` gives every layer of a later segment that segment's mask (and, under ``compact``, its shifted
rotary embeddings and position ids), built once per segment and step. Also here: `Flight`, the state of one stack
forward in flight (prefill or decoding step), which the pruner's hooks share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .decoder_spec import DecoderSpec, DropPlan
from .segments import Segment, Session, decoding_view

__all__ = ["Flight", "DecodingSteps", "hidden_of", "with_hidden"]


@dataclass
class Flight:
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
    prompt_scores: dict = field(default_factory=dict)  # drop layer -> (B, H, Q, L) prompt rows


def hidden_of(args: tuple, kwargs: dict) -> tuple[Tensor, bool]:
    """A decoder layer call's hidden states and whether they came positionally."""
    if args:
        return args[0], True
    return kwargs["hidden_states"], False


def with_hidden(args: tuple, kwargs: dict, hidden: Tensor, positional: bool) -> tuple[tuple, dict]:
    """The layer call's ``(args, kwargs)`` with ``hidden`` in place of its hidden states."""
    if positional:
        return (hidden, *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = hidden
    return args, kwargs


class DecodingSteps:
    """Mask and position rewriting for the decoding steps of a pruned cache.

    Args:
        spec: the decoder's `DecoderSpec`.
        positions: ``"keep"`` or ``"compact"`` (the pruner's position mode).
    """

    def __init__(self, spec: DecoderSpec, positions: str):
        self.spec = spec
        self.positions = positions

    def start(
        self, session: Session, cache: Any, kwargs: dict, input_mask: Callable[[dict], Any], flights: list
    ) -> dict:
        """The stack pre-hook of a decoding step: the stack kwargs with segment 0's 2-D mask and position ids
        (``input_mask``: stack kwargs -> the 2-D mask in original coordinates, or None). The step's `Flight` is
        appended to ``flights`` before its mask is built, so the stack forward hook pops it even when that fails."""
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
        mask = input_mask(kwargs)
        if mask is not None and mask.dim() != 2:
            raise ValueError("a pruned cache can only continue with a 2-D attention mask (or None)")
        flight = Flight(session=session, plan=None, decoding=True, cache=cache)
        flight.orig_mask = mask.bool() if mask is not None else None
        flight.orig_positions = positions
        flights.append(flight)
        kwargs["attention_mask"] = self.mask(session, seg0, flight, batch, past0 + q_len).to(
            mask.dtype if mask is not None else torch.long
        )
        kwargs["position_ids"] = self.shifted(seg0, positions)
        return kwargs

    def mask(self, session: Session, segment: Segment, flight: Flight, batch: int, total: int) -> Tensor:
        """(B, total) bool: ``segment``'s prefill mask followed by the mask of the tokens after the prefill."""
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

    def shifted(self, segment: Segment, positions: Tensor) -> Tensor:
        """Original position ids of new tokens as ``segment`` numbers them (minus its shift under ``compact``)."""
        if self.positions == "keep" or not bool(segment.shift.any()):
            return positions
        return self.spec.shift_positions(positions, segment.shift.view(-1, 1))

    def layer(self, number: int, flight: Flight, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        """The pre-hook of decoder layer ``number`` at a decoding step: its kwargs for its segment, or None."""
        session = flight.session
        seg_no = session.segment_of(number)
        if seg_no == 0 and self.spec.layer_kwargs is None:
            return None  # the stack rewrote segment 0's mask and position ids
        if seg_no > 0 and seg_no not in flight.per_segment:
            segment = session.segments[seg_no]
            hidden, _ = hidden_of(args, kwargs)
            batch, q_len = hidden.shape[:2]
            past = flight.cache.get_seq_length(segment.start)
            mask2d = self.mask(session, segment, flight, batch, past + q_len)
            overrides = {"attention_mask": self.spec.make_mask(hidden, mask2d, flight.cache, segment.start)}
            if self.positions == "compact":
                positions = self.shifted(segment, flight.orig_positions)
                overrides["position_embeddings"] = self.spec.rope(hidden, positions)
                overrides["position_ids"] = self.spec.layer_position_ids(positions)
            flight.per_segment[seg_no] = overrides
        kwargs = {**kwargs, **flight.per_segment.get(seg_no, {})}
        if self.spec.layer_kwargs is not None:  # every layer of every segment (its mask type, e.g. sliding windows)
            hidden, _ = hidden_of(args, kwargs)
            view = self.view(session, session.segments[seg_no], flight, hidden.shape[0])
            kwargs = self.spec.layer_kwargs(number, hidden, kwargs, view, flight.cache, False)
        return args, kwargs

    def view(self, session: Session, segment: Segment, flight: Flight, batch: int) -> Segment:
        """`decoding_view` of ``segment`` for this decoding step, built once per segment and reused by its layers."""
        key = ("view", segment.start)
        if key not in flight.per_segment:
            total = flight.cache.get_seq_length(segment.start) + flight.orig_positions.shape[-1]  # slots after this step
            mask2d, shift = self.mask(session, segment, flight, batch, total), partial(self.shifted, segment)
            flight.per_segment[key] = decoding_view(session, segment, mask2d, flight.orig_positions, shift)
        return flight.per_segment[key]
