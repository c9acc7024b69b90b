"""Writing an image's kept tokens into its first placeholder slots in a given order: the emission path of SparseVLM's
``append_merged`` hint ([critical ascending, merged ascending]) and of a `Selection.order` (a method's own order, e.g.
PruMerge's official [kept list, samples, extra token]). The image's other slots are dropped, so under ``keep``
positions the written tokens get the image's first, consecutive positions."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["emission_order", "write_first_slots"]


def emission_order(ranks: Tensor) -> Tensor:
    """(k,) long: which kept token goes to each of the first k slots, from the kept tokens' emission ranks (k,) long
    (`Selection.order` of one row, padding removed). Raises ``ValueError`` unless the ranks are 0..k-1 once each."""
    emit = ranks.argsort()  # (k,)
    if not torch.equal(ranks[emit].cpu(), torch.arange(ranks.numel())):
        raise ValueError(f"Selection.order must rank a row's {ranks.numel()} kept tokens 0..{ranks.numel() - 1} once each")
    return emit


def write_first_slots(
    keep: Tensor, values: Tensor, replace: Tensor, row: int, slots: Tensor, source: Tensor, held: Tensor, columns: Tensor,
    kept: Tensor, emit: Tensor,
) -> Tensor:
    """Write kept token ``kept[emit[j]]`` (its value ``source[emit[j]]``) into the image's slot ``slots[j]``, drop the
    image's other slots; returns the image's new ``held`` map (slot ``columns[j]`` holds that token's original).

    Args:
        keep, replace: (B, L) bool and values (B, L, D) of the drop's `Decision`, written in place at batch ``row``.
        slots: (n,) long the image's current slots; columns: (n,) long its present tokens (image coordinates).
        source: (k, D) the kept tokens' values in selection order; kept: (k,) long their indices among the n present.
        held: (num_tokens,) long the original token each image slot holds; emit: (k,) long, `emission_order`.
    """
    count = kept.numel()
    target = slots[:count]  # (k,)
    keep[row, slots[count:]] = False
    values[row, target] = source[emit].to(values.dtype)
    replace[row, target] = True
    new_held = held.clone()
    new_held[columns[:count].cpu()] = held[columns[kept[emit]].cpu()]
    return new_held
