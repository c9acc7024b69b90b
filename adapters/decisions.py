"""A drop's `Selection` turned into the decoder's `Decision` (keep mask, replacement values), and the drop's
`DropRecord` appended to the plan's records: `apply_selection` for every drop at the decoder input or a layer,
`apply_with_cls` for VisionZip's ``keep_cls=True`` at ``vision``. Both take the plan (``adapters.plan.Plan``) for
its per-image bookkeeping (``image_sample``, ``layouts``, ``held``, ``records``) and its context (``project``,
``hints``), as ``tower_merge.apply_tower_merge`` does for ``vision_layers``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vtprune.framework.hints import HINT_APPEND_MERGED
from vtprune.framework.selection import Selection
from vtprune.framework.signals import Signals

from .decoder_spec import Decision, DropState
from .first_slots import emission_order, write_first_slots
from .records import DropRecord
from .row_fields import held_record, pad_rows

__all__ = ["apply_selection", "apply_with_cls"]


def apply_with_cls(
    plan: Any, drop: Any, layer: int, budgets: list, selection: Selection, signals: Signals, columns: list[Tensor],
    slots: list[Tensor], state: DropState,
) -> Decision:
    """VisionZip ``keep_cls=True`` at ``vision``: each image gives the LLM its CLS token followed by the kept
    patches in the official order [CLS, dominant ascending, contextual ascending], written (through the
    projector) into the first ``count + 1`` placeholder slots of the image; the other slots are dropped. An
    image keeping all its patches has no free slot for CLS and is left untouched."""
    if plan.adapter.strategy(plan.call) != "default":
        raise ValueError("keep_cls=True needs vision_feature_select_strategy='default' (CLS not among the patches)")
    if not isinstance(plan.adapter.feature_layer(plan.call), int) or plan.capture.cls_token is None:
        raise RuntimeError("keep_cls=True: the CLS hidden state of the feature layer was not captured")
    if plan.capture.cls_token.shape[0] != plan.num_images:
        raise ValueError(f"keep_cls=True: {plan.capture.cls_token.shape[0]} crops for {plan.num_images} images")
    keep = torch.ones_like(state.valid)
    replace = torch.zeros_like(state.valid)
    values = None
    patches = selection.gather(signals.visual)  # (R, K, Dv): merged values where set
    rows_idx, rows_crit, rows_vals = [], [], []
    for r in range(plan.num_images):
        b = plan.image_sample[r]
        n = columns[r].numel()
        idx = selection.indices[r][selection.mask[r]]
        crit = selection.critical[r][selection.mask[r]]
        count = idx.numel()
        if count + 1 > n:  # nothing dropped: no slot for CLS, the image stays as it is
            rows_idx.append(columns[r])
            rows_crit.append(crit)
            rows_vals.append(signals.visual[r, :n])
            continue
        order = torch.cat([(crit).nonzero().flatten(), (~crit).nonzero().flatten()])  # dominant, then contextual
        sequence = torch.cat(
            [plan.capture.cls_token[r : r + 1].float().to(plan.device), patches[r][selection.mask[r]][order]]
        )  # (count + 1, Dv)
        with torch.no_grad():
            projected = plan.context.project(sequence.unsqueeze(0))[0]  # (count + 1, D)
        if values is None:
            values = torch.zeros(*state.valid.shape, projected.shape[-1], dtype=state.hidden.dtype, device=plan.device)
        target = slots[r][: count + 1]
        keep[b, slots[r][count + 1 :]] = False
        values[b, target] = projected.to(values.dtype)
        replace[b, target] = True
        rows_idx.append(columns[r][: count + 1])
        rows_crit.append(torch.cat([crit.new_ones(1), crit[order]]))
        rows_vals.append(sequence)
    width = max(t.numel() for t in rows_idx)
    record = Selection(
        indices=pad_rows([t.cpu() for t in rows_idx], width),
        mask=pad_rows([torch.ones(t.numel(), dtype=torch.bool) for t in rows_idx], width, value=False),
        critical=pad_rows([t.cpu() for t in rows_crit], width, value=False),
        values=pad_rows([v.detach().float().cpu() for v in rows_vals], width),
    )
    patch_record = Selection(
        indices=torch.stack([columns[r][selection.indices[r]] for r in range(plan.num_images)]).cpu()
        if plan.num_images
        else selection.indices.cpu(),
        mask=selection.mask.cpu(),
        critical=selection.critical.cpu(),
        values=None if selection.values is None else selection.values.detach().cpu(),
    )
    before = torch.tensor([c.numel() for c in columns], dtype=torch.long)
    plan.records.append(DropRecord(drop.where, layer, tuple(budgets), record, before, patches=patch_record))
    return Decision(keep=keep, values=values, replace=replace if values is not None else None)


def apply_selection(
    plan: Any, drop: Any, layer: int, budgets: list, selection: Selection, columns: list[Tensor], slots: list[Tensor],
    state: DropState,
) -> Decision:
    """The `Decision` of a drop at the decoder input or a layer, and its record (appended to ``plan.records``).

    Args:
        plan: the `Plan` of the prefill (``image_sample``, ``layouts``, ``held`` (updated here), ``context``).
        drop, layer, budgets: the drop point, its decoder layer (0 at the input) and the per-image budgets.
        selection: the pipeline's selection, rows over each image's present tokens ``columns[r]`` ((n_r,) long, image
            coordinates), whose current sequence slots are ``slots[r]`` ((n_r,) long).
        state: the decoder's `DropState` at the drop.

    A kept token stays in its slot, the others are dropped; merged ``values`` (projected at ``vision``) replace the
    kept slots' hidden states. With an emission order (``selection.order``, or SparseVLM's ``append_merged`` hint)
    each image's kept tokens, with their merged values or else their own hidden states, are written into the image's
    first slots in that order and its other slots dropped (`first_slots.write_first_slots`)."""
    keep = torch.ones_like(state.valid)  # (B, Ls)
    values = None
    replace = None
    kept = selection.kept_mask(max([c.numel() for c in columns] + [selection.indices.shape[1]]))
    if selection.values is not None:
        vals = selection.values
        if drop.where == "vision":
            vals = plan.context.project(vals)  # (R, K, D)
        values = torch.zeros(*state.valid.shape, vals.shape[-1], dtype=state.hidden.dtype, device=plan.device)
        replace = torch.zeros_like(state.valid)
    append = values is not None and HINT_APPEND_MERGED in plan.context.hints
    if selection.order is not None and values is None:  # an emission order without merged values
        values = torch.zeros_like(state.hidden)  # (B, Ls, D)
        replace = torch.zeros_like(state.valid)  # (B, Ls)
    # the record names original tokens (`held_record`): read before this drop rewrites any image's slots
    record = held_record(selection, columns, plan.held, max([layout.num_tokens for layout in plan.layouts] + [0]))
    for r in range(plan.num_images):
        b = plan.image_sample[r]
        n = columns[r].numel()
        idx = selection.indices[r][selection.mask[r]]
        if append or selection.order is not None:
            # the image's first slots, in the selection's order, else SparseVLM's [critical ascending, merged
            # ascending] (it appends its recycled tokens after the kept ones); its other slots are dropped
            crit = selection.critical[r][selection.mask[r]]
            order = emission_order(selection.order[r][selection.mask[r]]) if selection.order is not None else (
                torch.cat([crit.nonzero().flatten(), (~crit).nonzero().flatten()]))
            source = vals[r][selection.mask[r]] if selection.values is not None else state.hidden[b, slots[r][idx]]
            plan.held[r] = write_first_slots(keep, values, replace, b, slots[r], source, plan.held[r], columns[r], idx, order)
        else:
            keep[b, slots[r][~kept[r, :n]]] = False
            if values is not None:
                values[b, slots[r][idx]] = vals[r][selection.mask[r]].to(values.dtype)
                replace[b, slots[r][idx]] = True
    before = torch.tensor([c.numel() for c in columns], dtype=torch.long)
    plan.records.append(DropRecord(drop.where, layer, tuple(budgets), record, before))
    return Decision(keep=keep, values=values, replace=replace)
