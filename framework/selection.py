"""`Selection`: the result of a pipeline, and the conversion from per-token keep masks.

Stages work on dense (B, N) boolean masks, which makes uniqueness and padding rules trivial; the
pipeline turns the final mask into sorted indices with :func:`selection_from_masks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["Selection", "selection_from_masks", "assemble_selection", "positions_to_slots", "merge_output"]


@dataclass(frozen=True)
class Selection:
    """Which visual tokens each row keeps.

    Attributes:
        indices: (B, K) long. Row b holds its kept token positions in ascending order in its first
            ``counts[b]`` slots; the remaining slots are padding (value 0, ``mask`` False).
            K is the largest count in the batch. Kept positions are unique and always real tokens.
        mask: (B, K) bool, True for the real slots of ``indices`` (ragged K is a mask, never a
            truncation).
        critical: (B, K) bool, True where the kept token came from the critical selector.
        values: (B, K, D) or None. Replacement token values for merge-style stages (e.g. a token
            that absorbed the tokens merged into it); None means "keep the original values".
        sizes: (B, K) long or None (merging output). How many original tokens each kept slot stands
            for (1 for a token that absorbed nothing, 0 at padding slots); None when nothing merged.
        assignment: (B, N) long or None (merging output). For every original token of the row, the
            kept *slot* (0..K-1, an index into ``indices``) it was merged into or is; -1 for a token
            dropped without being merged anywhere and for padding. A kept token is assigned its own
            slot, so ``sizes[b, k] == (assignment[b] == k).sum()``. None when nothing merged.
        order: (B, K) long or None. The rank at which the language model receives each kept slot (0 = first; a
            permutation of 0..counts[b]-1 per row, -1 at padding); None = the ascending order of ``indices``.
            Set by a diversity stage that reproduces another emission order (`Supplement.order`); adapters write
            the kept tokens into the image's first placeholder slots in that order.

    The tensors are read-only results: ``mask`` and ``critical`` may be one tensor when every kept token
    is critical (``Pipeline.select``'s index path); copy before modifying one in place.
    """

    indices: Tensor  # (B, K) long
    mask: Tensor  # (B, K) bool
    critical: Tensor  # (B, K) bool
    values: Optional[Tensor] = None  # (B, K, D)
    sizes: Optional[Tensor] = None  # (B, K) long
    assignment: Optional[Tensor] = None  # (B, N) long
    order: Optional[Tensor] = None  # (B, K) long

    @property
    def counts(self) -> Tensor:
        """(B,) long: number of kept tokens per row."""
        return self.mask.sum(dim=1)

    def kept_mask(self, num_tokens: int) -> Tensor:
        """(B, N) bool: True at every kept position."""
        batch = self.indices.shape[0]
        # Padding slots point at an extra sink column that is cut off afterwards.
        target = torch.where(self.mask, self.indices, torch.full_like(self.indices, num_tokens))  # (B, K)
        dense = torch.zeros(batch, num_tokens + 1, dtype=torch.bool, device=self.indices.device)
        dense.scatter_(1, target, True)
        return dense[:, :num_tokens]  # (B, N)

    def row_indices(self, row: int) -> Tensor:
        """(K_b,) long: the kept positions of one row, without padding."""
        return self.indices[row][self.mask[row]]

    def gather(self, tokens: Tensor) -> Tensor:
        """(B, K, D): the kept tokens of ``tokens`` (B, N, D), or ``values`` where a stage set them.

        Padding slots repeat token 0 of their row; use ``mask`` to ignore them.
        """
        if self.values is not None:
            return self.values.to(tokens.dtype)
        index = self.indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])  # (B, K, D)
        return tokens.gather(1, index)


def selection_from_masks(
    keep: Tensor, critical: Tensor, values: Optional[Tensor] = None
) -> Selection:
    """Build a `Selection` from dense masks.

    Args:
        keep: (B, N) bool, True at every kept token.
        critical: (B, N) bool, True at kept tokens chosen by the critical selector (subset of keep).
        values: (B, N, D) or None: replacement values indexed by token position; only the kept
            positions are read.
    """
    width = int(keep.sum(dim=1).max().item()) if keep.numel() else 0
    return assemble_selection(keep, critical, values, width)


def assemble_selection(
    keep: Tensor,
    critical: Tensor,
    values: Optional[Tensor],
    width: int,
    sizes: Optional[Tensor] = None,
    assignment: Optional[Tensor] = None,
    order: Optional[Tensor] = None,
) -> Selection:
    """`selection_from_masks` with the largest row count ``width`` given (no host sync).

    Merging output (both or neither): ``sizes`` (B, N) long, the size of the token at each kept position;
    ``assignment`` (B, N) long, for every token the *position* of the kept token it was merged into (itself
    for a kept token), -1 for none. They become the `Selection`'s per-slot ``sizes`` and slot ``assignment``.
    ``order`` (B, N) long: each kept position's emission rank (`Supplement.order`), -> ``Selection.order``.
    """
    # A stable descending sort of the keep flags puts each row's kept positions first, ascending,
    # and the sorted flags are the slot mask.
    flags, by_flag = keep.sort(dim=1, descending=True, stable=True)  # (B, N), (B, N)
    slot_mask = flags[:, :width]  # (B, K)
    indices = by_flag[:, :width] * slot_mask  # (B, K): padding slots hold 0
    kept_critical = critical.gather(1, indices) & slot_mask  # (B, K)
    kept_values = None
    if values is not None:
        index = indices.unsqueeze(-1).expand(-1, -1, values.shape[-1])  # (B, K, D)
        kept_values = values.gather(1, index)
    if (sizes is None) != (assignment is None):
        raise ValueError("merging output needs both sizes and assignment (or neither)")
    slot_sizes = slot_assignment = None
    if sizes is not None:
        slot_sizes = sizes.gather(1, indices) * slot_mask  # (B, K): 0 at padding slots
        slot_assignment = positions_to_slots(assignment, indices, slot_mask)  # (B, N)
    slot_order = None
    if order is not None:
        slot_order = torch.where(slot_mask, order.gather(1, indices), torch.full_like(indices, -1))  # (B, K)
    return Selection(
        indices=indices, mask=slot_mask, critical=kept_critical, values=kept_values,
        sizes=slot_sizes, assignment=slot_assignment, order=slot_order,
    )


def positions_to_slots(assignment: Tensor, indices: Tensor, mask: Tensor) -> Tensor:
    """(B, N) long: ``assignment`` (B, N) of kept *positions* (-1 = none) as slots of ``indices`` / ``mask``
    (B, K); a position that is not kept maps to -1."""
    batch, tokens = assignment.shape
    slot_of = torch.full((batch, tokens + 1), -1, dtype=torch.long, device=assignment.device)  # (B, N + 1)
    target = torch.where(mask, indices, torch.full_like(indices, tokens))  # (B, K): padding -> sink column
    slots = torch.arange(indices.shape[1], device=indices.device).expand_as(indices)  # (B, K)
    slot_of.scatter_(1, target, slots)
    slot_of[:, tokens] = -1
    mapped = slot_of.gather(1, assignment.clamp(min=0))  # (B, N)
    return torch.where(assignment >= 0, mapped, torch.full_like(mapped, -1))


def merge_output(keep: Tensor, assignment: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Position-level (sizes, assignment) of a whole kept set from a merging stage's ``assignment`` (B, N) long
    (`Supplement.assignment`: position merged into, -1 = none): every kept token is assigned its own position,
    padding (``valid`` False) none; ``sizes`` (B, N) long counts the tokens assigned to each position."""
    tokens = keep.shape[1]
    positions = torch.arange(tokens, device=keep.device).expand_as(keep)  # (B, N)
    merged = torch.where(keep, positions, assignment.long())  # (B, N)
    merged = torch.where(valid & (merged >= 0), merged, torch.full_like(merged, -1))  # (B, N)
    target = torch.where(merged >= 0, merged, torch.full_like(merged, tokens))  # (B, N): none -> sink column
    sizes = torch.zeros(keep.shape[0], tokens + 1, dtype=torch.long, device=keep.device)  # (B, N + 1)
    sizes.scatter_add_(1, target, torch.ones_like(target))
    return sizes[:, :tokens], merged
