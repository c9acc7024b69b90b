"""Per-row fields of a drop derived from the rows' `ImageLayout`s and their present tokens: the video frame
structure (`Signals.frames` / ``frame_index``) and a merging selection's assignment in each image's own token
indices (for `DropRecord`), and the frames each present token stands for after earlier merges (`Signals.frame_span`)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from .records import ImageLayout

__all__ = ["frame_fields", "frame_spans", "image_assignment"]

#: Drop kinds whose record's ``indices`` / ``assignment`` are in the image's own token coordinates (the tower's
#: ``vision_layers`` merges map the tower's patches instead).
_TOKEN_COORDINATE_DROPS = ("vision", "pre_llm", "layer")


def image_assignment(assignment: Tensor, columns: list[Tensor], layouts: Sequence[ImageLayout]) -> Tensor:
    """(R, max num_tokens) long, CPU: a selection's slot ``assignment`` (R, N) over the present tokens of each image
    (``columns[r]``, image-token coordinates) put at the image's own token indices; -1 for tokens absent at the
    drop, dropped unmerged, and past an image's end."""
    width = max([layout.num_tokens for layout in layouts] + [0])
    out = torch.full((len(columns), width), -1, dtype=torch.long)
    for r, present in enumerate(columns):
        out[r, present.cpu()] = assignment[r, : present.numel()].cpu()
    return out


def frame_fields(layouts: Sequence[ImageLayout], columns: list[Tensor], width: int, device: Any) -> tuple[Tensor, Tensor]:
    """``Signals.frames`` (R, 3) and ``frame_index`` (R, width) of a drop from the rows' layouts and their present
    tokens (``columns[r]``, image-token coordinates, ascending). A video row keeps its (T, H, W) while all its
    tokens are present; a row without frames (an image) or with tokens already dropped (the frame grid is broken,
    as ``grid`` is) gets (0, 0, 0) and -1 everywhere, as does padding."""
    frames = torch.zeros(len(layouts), 3, dtype=torch.long)  # (R, 3)
    index = torch.full((len(layouts), width), -1, dtype=torch.long)  # (R, N)
    for r, (layout, present) in enumerate(zip(layouts, columns)):
        if layout.frames is None or present.numel() != layout.num_tokens:
            continue
        frames[r] = torch.tensor(layout.frames, dtype=torch.long)
        index[r, : present.numel()] = layout.frame_index[present.cpu()]
    return frames.to(device), index.to(device)


def frame_spans(
    layouts: Sequence[ImageLayout], columns: list[Tensor], records: Sequence[Any], width: int, device: Any,
) -> Tensor:
    """``Signals.frame_span`` (R, width, 2) long of a drop: for each present token (``columns[r]``, image-token
    coordinates) the first and last frame of the image's original frame tokens it stands for, following the
    ``assignment`` of the forward's earlier drops (``records``, `DropRecord`s in drop order): a kept token stands
    for itself and every token merged into it. (-1, -1) where it stands for no frame token (newlines, image rows,
    padding) and after a ``vision_layers`` merge (its assignment maps the tower's patches, not these tokens)."""
    spans = torch.full((len(layouts), width, 2), -1, dtype=torch.long)  # (R, N, 2)
    for r, (layout, present) in enumerate(zip(layouts, columns)):
        if layout.frame_index is None:
            continue
        index = layout.frame_index.cpu()  # (n,)
        first = torch.where(index >= 0, index, torch.full_like(index, layout.num_tokens + 1))  # (n,): none = above any frame
        last = index.clone()  # (n,): none = -1
        known = True
        for record in records:
            selection = record.selection
            if record.where not in _TOKEN_COORDINATE_DROPS:
                known = False
                break
            if selection.assignment is None:
                continue  # a plain drop: kept tokens stand for what they stood for
            slots = selection.assignment[r, : layout.num_tokens].cpu()  # (n,): slot each token went to, -1 = gone
            kept = selection.indices[r][selection.mask[r]].cpu()  # (K,): image-token index of each slot
            merged = slots >= 0  # (n,)
            target = kept[slots[merged]]  # (m,): the token each merged token now is
            new_first = torch.full_like(first, layout.num_tokens + 1).scatter_reduce(0, target, first[merged], "amin")
            new_last = torch.full_like(last, -1).scatter_reduce(0, target, last[merged], "amax")
            first, last = new_first, new_last
        if not known:
            continue
        here = present.cpu()  # (n_r,)
        lo, hi = first[here], last[here]  # (n_r,)
        none = hi < 0  # (n_r,)
        spans[r, : here.numel(), 0] = torch.where(none, torch.full_like(lo, -1), lo)
        spans[r, : here.numel(), 1] = torch.where(none, torch.full_like(hi, -1), hi)
    return spans.to(device)
