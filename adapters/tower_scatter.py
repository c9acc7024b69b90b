"""The ``vision_layers`` drop for towers whose crops the model packs itself (``tower_layout = "sources"``,
LLaVA-NeXT's AnyRes): one representative per merged token, the rest of the image's patch placeholders dropped.

ToMe's merged tokens do not form a grid, so `TowerMerge` gives every original patch position of a crop its merged
token's value (the projector output gathered by the patch -> slot map) and the model packs the crops as usual
(unpadding, ``image_newline`` after each grid row). Here, at the decoder input, each merged token keeps the
placeholder of its *first* source patch that survived the packing (first in the packed order, which within one
crop is the row-major patch order), and the other placeholders of its sources are dropped. A merged token whose
sources were all cut by the unpadding is dropped with them (its value is padding the model discards anyway).
Newline tokens are kept: they are no vision-tower tokens, the model inserts them after merging, and keeping them
makes keep-all (nothing merged) the unpruned model exactly.

Which merged token a placeholder carries is read back from the values (the packing only slices, reshapes and inserts
newlines, so each image placeholder equals exactly one merged token's projected value, byte for byte), as
``LlavaNextAdapter.vision_rows`` does; two merged tokens with identical bytes would be ambiguous and raise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vtprune.framework.selection import Selection

from .decoder import Decision, DropState
from .records import DropRecord
from .value_match import value_ids, value_table

__all__ = ["apply_sources", "representatives"]


def _slot_table(projected: Tensor, dtype: torch.dtype) -> dict[bytes, int]:
    """{bytes of a merged token's value: its global id (crop * k + slot)} over (crops, k, D) ``projected``."""
    return value_table(projected.to(dtype), duplicate_error=(
        "placement vision_layers: two merged tokens have identical values, so their placeholders cannot be told apart"
    ))


def representatives(ids: Tensor, newline: Tensor) -> tuple[Tensor, Tensor]:
    """Which of an image's packed tokens stay, and where each one goes.

    Args:
        ids: (n,) long, the merged token (global id) each packed token carries; ignored at newlines.
        newline: (n,) bool, True at ``image_newline`` tokens.
    Returns:
        keep: (n,) bool, True at newlines and at the first packed position of every merged token;
        assignment: (n,) long, every packed token's index among the kept ones (a kept token its own).
    """
    n = ids.numel()
    order = torch.arange(n, device=ids.device)  # (n,)
    ids = torch.where(newline, -1 - order, ids)  # newlines: ids of their own
    unique, inverse = torch.unique(ids, return_inverse=True)  # (u,), (n,)
    first = torch.full((unique.numel(),), n, dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")  # (u,): first packed position per id
    keep = torch.zeros(n, dtype=torch.bool, device=ids.device)
    keep[first] = True
    rank = keep.long().cumsum(0) - 1  # (n,): index among the kept tokens
    return keep, rank[first[inverse]]


def apply_sources(plan: Any, drop: Any, layer: int, budgets: list, state: DropState, run: Any) -> Decision:
    """The ``vision_layers`` drop of a `Plan` on a ``"sources"`` tower layout (see the module docstring); records
    per image the kept packed positions, the packed tokens each stands for (``sizes``, summing to the image's
    tokens) and every packed token's kept slot (``assignment``)."""
    columns, slots = plan._rows(state)
    keep = torch.ones_like(state.valid)
    kept_rows, assignments = [], []
    table = _slot_table(run.projected, plan.token_embeds[0].dtype) if run.slots is not None else None
    for r, layout in enumerate(plan.layouts):
        n = layout.num_tokens
        newline = layout.newline.cpu() if layout.newline is not None else torch.zeros(n, dtype=torch.bool)
        if table is None:  # nothing merged: every token stays
            row_keep, assignment = torch.ones(n, dtype=torch.bool), torch.arange(n)
        else:
            ids = value_ids(table, plan.token_embeds[r], plan.token_embeds[r].dtype, missing=-2)  # (n,)
            ids = torch.where(newline, torch.full_like(ids, -1), ids)  # newlines carry no merged token
            if bool((ids == -2).any()):
                raise RuntimeError("placement vision_layers: an image placeholder carries no merged token of the tower")
            row_keep, assignment = representatives(ids, newline)
        present = columns[r].cpu()
        keep[plan.image_sample[r], slots[r][~row_keep[present]].to(keep.device)] = False
        kept_rows.append(row_keep.nonzero().flatten())
        assignments.append(assignment)
    width = max(k.numel() for k in kept_rows)
    tokens = max(a.numel() for a in assignments)
    images = plan.num_images
    indices = torch.zeros(images, width, dtype=torch.long)
    mask = torch.zeros(images, width, dtype=torch.bool)
    sizes = torch.zeros(images, width, dtype=torch.long)
    assignment = torch.full((images, tokens), -1, dtype=torch.long)
    for r, (kept, assigned) in enumerate(zip(kept_rows, assignments)):
        indices[r, : kept.numel()] = kept
        mask[r, : kept.numel()] = True
        sizes[r, : kept.numel()] = torch.bincount(assigned, minlength=kept.numel())
        assignment[r, : assigned.numel()] = assigned
    record = Selection(indices=indices, mask=mask, critical=torch.zeros_like(mask), sizes=sizes, assignment=assignment)
    before = torch.tensor([c.numel() for c in columns], dtype=torch.long)
    plan.records.append(DropRecord(drop.where, layer, tuple(budgets), record, before))
    return Decision(keep=keep, values=None, replace=None)
