"""Per-row fields of a drop derived from the rows' `ImageLayout`s and their present tokens: the video frame
structure (`Signals.frames` / ``frame_index``), the decoder input embeddings (`Signals.input_visual` /
``input_prompt``), and a selection in each image's own token indices (for `DropRecord`), also after a drop that
wrote other tokens into an image's slots (`held_record`)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from vtprune.framework.selection import Selection

from .records import ImageLayout

__all__ = ["frame_fields", "held_record", "image_assignment", "input_fields", "pad_rows"]


def pad_rows(rows: list[Tensor], width: Optional[int] = None, value: float = 0.0) -> Tensor:
    """(R, max(len, width), ...): the rows (n_r, ...) stacked, each padded with ``value`` past its length."""
    width = max([r.shape[0] for r in rows] + [width or 0])
    out = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), value)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def input_fields(token_embeds: list[Tensor], prompt_embeds: list[Tensor]) -> dict[str, Tensor]:
    """``input_visual`` (R, M, D) fp32 / ``input_visual_mask`` (R, M) / ``input_prompt`` (R, T, D) fp32: each image's
    decoder input embeddings (all its tokens, before any drop) and its sample's prompt tokens' (rows as the drop's
    ``prompt``; no ``input_prompt`` when no image has a prompt token, as there is no ``prompt`` then)."""
    fields = {
        "input_visual": pad_rows([e.float() for e in token_embeds]),
        "input_visual_mask": pad_rows([torch.ones(e.shape[0], dtype=torch.bool, device=e.device) for e in token_embeds], value=False),
    }
    if max(p.shape[0] for p in prompt_embeds) > 0:
        fields["input_prompt"] = pad_rows([p.float() for p in prompt_embeds])
    return fields


def held_record(selection: Selection, columns: list[Tensor], held: list[Tensor], num_tokens: int) -> Selection:
    """The drop's ``selection`` (rows over each image's present tokens ``columns[r]``, its slot ids in image-token
    coordinates) as a CPU `Selection` over the image's *original* tokens: ``held[r]`` (num_tokens_r,) long names the
    original token each image slot holds (the identity until a drop writes other tokens into the image's first
    slots, SparseVLM's ``append_merged``). Kept tokens come out in ascending original order, ``critical`` /
    ``values`` / ``sizes`` with them; ``assignment`` (R, num_tokens) maps each original token to its new slot, -1
    for tokens absent at the drop or dropped unmerged."""
    rows, width = len(columns), selection.indices.shape[1]
    indices = torch.zeros(rows, width, dtype=torch.long)
    order = torch.arange(width).repeat(rows, 1)  # (R, K): new slot j <- the selection's slot order[r, j]
    rank = torch.full((rows, width + 1), -1, dtype=torch.long)  # (R, K + 1): selection slot -> new slot; -1 -> -1
    mask = selection.mask.cpu()
    assignment = None if selection.assignment is None else torch.full((rows, num_tokens), -1, dtype=torch.long)
    for r, present in enumerate(columns):
        originals = held[r][present.cpu()]  # (n,) original token of each present token
        count = int(mask[r].sum())
        kept = originals[selection.indices[r, :count].cpu()]  # (k,)
        sort = kept.argsort()  # (k,) originals are unique
        indices[r, :count] = kept[sort]
        order[r, :count] = sort
        rank[r, sort] = torch.arange(count)
        if assignment is not None:
            slots = selection.assignment[r, : present.numel()].cpu()  # (n,) selection slot or -1
            assignment[r, originals] = rank[r].gather(0, torch.where(slots >= 0, slots, width))

    def permuted(value: Optional[Tensor]) -> Optional[Tensor]:
        if value is None:
            return None
        value = value.detach().cpu()
        index = order.view(*order.shape, *([1] * (value.dim() - 2))).expand(-1, -1, *value.shape[2:])
        return value.gather(1, index)  # padding slots stay where they were
    return Selection(
        indices=indices, mask=mask, critical=permuted(selection.critical), values=permuted(selection.values),
        sizes=permuted(selection.sizes), assignment=assignment,
    )


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
