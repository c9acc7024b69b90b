"""Per-row fields of a drop derived from the rows' `ImageLayout`s and their present tokens: the video frame
structure (`Signals.frames` / ``frame_index``) and a merging selection's assignment in each image's own token
indices (for `DropRecord`)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from .records import ImageLayout

__all__ = ["frame_fields", "image_assignment"]


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
