"""Which projected vision token an LLM input embedding was copied from, matched byte for byte.

Models that pack crops themselves (LLaVA-NeXT's AnyRes: unpadding, ``image_newline`` after each grid row) only
slice, reshape and insert newlines, so every non-newline image token of the LLM input equals exactly one projector
output row. ``LlavaNextAdapter.vision_rows`` and the ``vision_layers`` drop on such towers (`tower_scatter`) read
that correspondence back through these two functions.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["value_table", "value_ids"]


def value_table(values: Tensor, *, duplicate_error: Optional[str] = None) -> dict[bytes, int]:
    """{bytes of a row of ``values`` (..., D), flattened to (M, D): its index}. A repeated row keeps its first index,
    or raises ``RuntimeError(duplicate_error)`` when that message is given (the rows must be told apart)."""
    raw = values.detach().reshape(-1, values.shape[-1]).contiguous().cpu().view(torch.uint8).numpy()  # (M, D * bytes)
    table: dict[bytes, int] = {}
    for i in range(raw.shape[0]):
        key = raw[i].tobytes()
        if key in table:
            if duplicate_error is not None:
                raise RuntimeError(duplicate_error)
            continue
        table[key] = i
    return table


def value_ids(table: dict[bytes, int], embeds: Tensor, dtype: torch.dtype, missing: int = -1) -> Tensor:
    """(n,) long, CPU: the ``table`` index of each row of ``embeds`` (n, D) cast to ``dtype`` (the table's), ``missing``
    where no row matches."""
    keys = embeds.detach().to(dtype).contiguous().cpu().view(torch.uint8).numpy()  # (n, D * bytes)
    return torch.tensor([table.get(keys[i].tobytes(), missing) for i in range(keys.shape[0])], dtype=torch.long)
