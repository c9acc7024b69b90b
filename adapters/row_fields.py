"""Per-row fields of a drop derived from the rows' `ImageLayout`s and their present tokens: the video frame
structure (`Signals.frames` / ``frame_index``), the decoder input embeddings (`Signals.input_visual` /
``input_prompt``), a selection in each image's own token indices (for `DropRecord`), also after a drop that
wrote other tokens into an image's slots (`held_record`), and the frames each present token stands for after
earlier merges (`Signals.frame_span`)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from vtprune.framework.selection import Selection

from .records import ImageLayout

__all__ = [
    "frame_fields", "frame_spans", "held_record", "input_fields", "pad_rows", "view_fields", "visual_attention_field",
    "visual_query_slots",
]


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
        sizes=permuted(selection.sizes), assignment=assignment, order=permuted(selection.order),
    )

#: Drop kinds whose record's ``indices`` / ``assignment`` are in the image's own token coordinates (the tower's
#: ``vision_layers`` merges map the tower's patches instead).
_TOKEN_COORDINATE_DROPS = ("vision", "pre_llm", "layer")


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


def view_fields(layouts: Sequence[ImageLayout], columns: list[Tensor], width: int, device: Any) -> Tensor:
    """``Signals.view_index`` (R, width) long of a drop: the view of each present token (``columns[r]``, the image's
    original token indices) from its layout's ``views``; 0 for every token of an image of one view (``views`` None);
    -1 at tokens of no view (newlines) and padding. Views stay meaningful after earlier drops (a subset of a view is
    still that view)."""
    index = torch.full((len(layouts), width), -1, dtype=torch.long)  # (R, N)
    for r, (layout, present) in enumerate(zip(layouts, columns)):
        here = present.cpu()  # (n_r,)
        index[r, : here.numel()] = 0 if layout.views is None else layout.views.cpu()[here]
    return index.to(device)


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


def visual_query_slots(prompt_slots: Tensor, image_slots: list[Tensor], image_sample: Sequence[int]) -> Tensor:
    """(B, Q + V) long: each sample's prompt query slots (B, Q) followed by the current slots of all its images'
    tokens in image order (V = the most image tokens of a sample; a shorter sample repeats its last slot, rows never
    read), so that one attention-row pass gives the prompt rows and the visual rows (`visual_attention_field`)."""
    per_sample = [[s for r, s in enumerate(image_slots) if image_sample[r] == b] for b in range(prompt_slots.shape[0])]
    joined = [torch.cat(parts) if parts else prompt_slots[b, -1:] for b, parts in enumerate(per_sample)]
    width = max(j.numel() for j in joined)
    extra = torch.stack([torch.cat([j, j[-1:].expand(width - j.numel())]) for j in joined])  # (B, V)
    return torch.cat([prompt_slots, extra.to(prompt_slots.device)], dim=1)


def visual_attention_field(
    rows: Tensor, prompts: Sequence[Tensor], image_slots: list[Tensor], image_sample: Sequence[int], width: int
) -> Tensor:
    """``visual_attention`` (R, H, N, N) fp32 from the attention rows of `visual_query_slots` (B, H, Q + V, L): image
    r's rows are its tokens' query rows (after the Q prompt rows and the sample's earlier images), its columns their
    slots; zero past each image's n_r tokens."""
    queries = max([p.numel() for p in prompts] + [1])
    offsets: dict[int, int] = {}
    out = []
    for r, slots in enumerate(image_slots):
        b = image_sample[r]
        start = queries + offsets.get(b, 0)
        offsets[b] = offsets.get(b, 0) + slots.numel()
        block = rows[b, :, start : start + slots.numel()][:, :, slots].float()  # (H, n, n)
        padded = block.new_zeros(block.shape[0], width, width)
        padded[:, : slots.numel(), : slots.numel()] = block
        out.append(padded)
    return torch.stack(out)  # (R, H, N, N)
