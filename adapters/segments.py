"""Segments and sessions of a pruned prefill: which slots each run of decoder layers sees, and how a keep
mask compacts a segment (see ``vtprune.adapters.decoder`` for the vocabulary)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .decoder_spec import Decision, DecoderSpec, gather_seq

__all__ = ["Segment", "Session", "compact_segment"]


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
