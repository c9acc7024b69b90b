"""M-RoPE position ids of the Qwen-VL decoders, as the decoder machinery drives them: the stack always gets
``(4, B, L)`` ids (the 1-D text positions on top of the three M-RoPE rows). Pure functions, no model."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["text_positions", "with_text_row", "compact_positions", "continuation_positions", "text_row"]


def text_positions(mask2d: Tensor) -> Tensor:
    """(B, L) 1-D text positions of a fresh sequence: ``cumsum(mask) - 1``, 0 at padding (what
    ``generate`` puts in the first row of its 4-row position ids).

    >>> text_positions(torch.tensor([[False, True, True], [True, True, True]])).tolist()
    [[0, 0, 1], [0, 1, 2]]
    """
    return (mask2d.long().cumsum(dim=1) - 1).masked_fill(~mask2d.bool(), 0)


def with_text_row(position_ids: Optional[Tensor], mask2d: Tensor) -> Tensor:
    """Stack-level (4, B, L) position ids of a prefill: text positions, then the three M-RoPE rows.

    Args:
        position_ids: (3, B, L) or (4, B, L) (returned unchanged), (B, L), or None (the text model's
            default: ``arange(L)`` on the three axes).
        mask2d: (B, L) bool.
    """
    if position_ids is not None and position_ids.dim() == 3 and position_ids.shape[0] == 4:
        return position_ids
    text = text_positions(mask2d)  # (B, L)
    if position_ids is None:
        batch, length = mask2d.shape
        position_ids = torch.arange(length, device=mask2d.device).expand(3, batch, length)
    elif position_ids.dim() == 2:
        position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
    position_ids = position_ids.expand(3, text.shape[0], -1)
    return torch.cat([text.unsqueeze(0).to(position_ids.dtype), position_ids], dim=0)  # (4, B, L)


def compact_positions(position_ids: Tensor, delta: Tensor) -> Tensor:
    """``compact`` renumbering: every row becomes the text position minus ``delta``.

    Args:
        position_ids: (4, B, S) stack-level ids (text row first).
        delta: (B, S) or (B, 1) tokens dropped before each slot.
    Returns: (4, B, S): ``0 .. K-1`` over the kept tokens of a prefill, ``K + n`` for the n-th later token.

    >>> ids = torch.tensor([[[0, 3, 4]], [[0, 2, 4]], [[0, 1, 4]], [[0, 1, 4]]])  # (4, 1, 3)
    >>> compact_positions(ids, torch.tensor([[0, 2, 2]]))[:, 0].tolist()
    [[0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1, 2]]
    """
    if position_ids.shape[0] != 4:
        raise ValueError(f"compact positions need the (4, B, S) stack-level ids, got {tuple(position_ids.shape)}")
    text = position_ids[0] - delta.to(position_ids.dtype)  # (B, S)
    return text.unsqueeze(0).expand(4, -1, -1).contiguous()


def continuation_positions(original: Tensor, mask2d: Optional[Tensor], seen: int, new: int) -> Tensor:
    """Stack-level (4, B, new) ids, in the unpruned sequence's coordinates, of ``new`` tokens that
    follow a prompt whose prefill had ids ``original`` (4, B, L) and ``seen`` later tokens.

    ``mask2d`` (B, L + seen + new) is the attention mask in unpruned coordinates (what ``generate``
    keeps), or None (no padding). The M-RoPE rows are text position + rope delta, the delta being
    ``max M-RoPE id + 1 - real prompt tokens`` (``Qwen2VLModel.get_rope_index``'s ``rope_deltas``).
    """
    text_prefill, mrope_prefill = original[0], original[1:]  # (B, L), (3, B, L)
    real = text_prefill.amax(dim=1) + 1  # (B,)
    delta = mrope_prefill.amax(dim=(0, 2)) + 1 - real  # (B,)
    if mask2d is not None:
        text = (mask2d.long().cumsum(dim=1) - 1)[:, -new:]  # (B, new)
    else:
        text = real.unsqueeze(1) + seen + torch.arange(new, device=original.device)  # (B, new)
    text = text.to(original.dtype)
    mrope = (text + delta.unsqueeze(1)).unsqueeze(0).expand(3, -1, -1)  # (3, B, new)
    return torch.cat([text.unsqueeze(0), mrope], dim=0)  # (4, B, new)


def text_row(position_ids: Tensor) -> Optional[Tensor]:
    """The ``position_ids`` the decoder layers receive: the text row of (4, B, L) ids, else None (what
    ``Qwen2VLTextModel`` passes)."""
    return position_ids[0] if position_ids.dim() == 3 and position_ids.shape[0] == 4 else None
