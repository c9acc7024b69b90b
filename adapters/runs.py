"""Visual items as runs of placeholder tokens (InternVL, Idefics3 / SmolVLM).

Families whose processor writes each visual item as one unbroken run of placeholders between marker text
(InternVL: ``<img>`` / ``</img>`` around all tiles of an image; Idefics3: ``<row_i_col_j>`` / ``<global-img>`` before
each sub-image) and whose vision features are one fixed-size block per tile / crop, in the order the runs appear.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .records import ImageLayout
from .spans import consecutive_runs

__all__ = ["placeholder_runs", "split_blocks", "square_layouts"]


def placeholder_runs(kinds: Optional[Tensor], name: str) -> list[int]:
    """Lengths of the maximal runs of consecutive visual placeholders in ``kinds`` ((B, L), -1 at text), row-major
    over the batch (the order the model scatters the vision features in)."""
    if kinds is None:
        raise ValueError(f"{name}: the placeholders of this forward could not be located (no input_ids / inputs_embeds)")
    lengths: list[int] = []
    for row in kinds >= 0:  # (L,) per sample
        lengths += [length for _, length in consecutive_runs(row.nonzero().flatten().tolist())]
    return lengths


def split_blocks(per_block: Tensor, counts: list[int], name: str) -> list[Tensor]:
    """Per item, its rows of a per-tile tensor (tiles, n, C), tiles in item order: (count, C) each."""
    flat = per_block.reshape(-1, per_block.shape[-1])  # (tiles * n, C)
    if flat.shape[0] != sum(counts):
        raise ValueError(f"{name}: the vision side has {flat.shape[0]} tokens for {sum(counts)} visual tokens in the input")
    return list(flat.split(counts))


def square_layouts(counts: list[int], side: int) -> list[ImageLayout]:
    """One layout per item; an item of exactly one ``side x side`` block is that row-major grid."""
    return [ImageLayout(count, None, (side, side) if count == side * side else None) for count in counts]
