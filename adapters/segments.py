"""Segments and sessions of a pruned prefill: which slots each run of decoder layers sees, and how a keep
mask compacts a segment (see ``vtprune.adapters.decoder`` for the vocabulary)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .decoder_spec import Decision, DecoderSpec, gather_seq

__all__ = ["Segment", "Session", "compact_segment", "decoding_view"]


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


def decoding_view(
    session: Session, segment: Segment, mask2d: Tensor, new_positions: Tensor, shift: Callable[[Tensor], Tensor]
) -> Segment:
    """``segment`` extended by the tokens after the pruned prefill (those cached and those in flight): what a decoding
    layer of the segment sees as keys (a sliding-window cache layer holds the last of them).

    Args:
        mask2d: (B, Ls + T) bool decoding 2-D mask of the segment's slots and the T tokens after the prefill.
        new_positions: stack-level original position ids of the tokens in flight (``(..., B or 1, q)``).
        shift: original position ids -> the segment's (identity for ``keep``, minus the shift for ``compact``).

    The view's ``index`` gives a token after the prefill the original length plus its rank, ``valid`` is True for
    them, ``rel`` continues segment 0's slots, ``positions`` gives the earlier ones each row's last prefill position
    id plus their rank (then ``shift``), the in-flight ones ``new_positions`` (then ``shift``).
    """
    batch, tail_len = mask2d.shape[0], mask2d.shape[1] - segment.length
    q_len = new_positions.shape[-1]
    device = segment.index.device
    tail = torch.arange(session.length, session.length + tail_len, device=device).unsqueeze(0).expand(batch, -1)
    original = session.original_positions
    positions = new_positions.expand(*new_positions.shape[:-2], batch, q_len).to(original.dtype)  # (..., B, q)
    if tail_len > q_len:  # earlier decoding steps continue each row's prefill positions
        last = original[..., -1:].expand(*original.shape[:-2], batch, 1)  # (..., B, 1)
        earlier = last + (tail[:, : tail_len - q_len] - session.length + 1).to(original.dtype)  # (..., B, T - q)
        positions = torch.cat([earlier, positions], dim=-1)  # (..., B, T)
    return Segment(
        start=segment.start,
        index=torch.cat([segment.index, tail], dim=1),  # (B, Ls + T)
        rel=torch.cat([segment.rel, tail - session.length + session.segments[0].length], dim=1),  # (B, Ls + T)
        valid=torch.cat([segment.valid, torch.ones(batch, tail_len, dtype=torch.bool, device=device)], dim=1),
        mask2d=mask2d,
        positions=torch.cat([segment.positions, shift(positions).to(segment.positions.dtype)], dim=-1),
        shift=segment.shift,
        dropped=segment.dropped,
    )
