"""`ForwardCall`: one forward of the multimodal model in flight, as the runtime records it (a plain record)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor

__all__ = ["ForwardCall"]


@dataclass
class ForwardCall:
    """One forward of the multimodal model in flight.

    Attributes:
        input_ids: (B, L) or None (``inputs_embeds`` given).
        image_mask: (B, L) bool, True at visual placeholders (None: no visual input found).
        has_images: whether the call carries visual input.
        kwargs: the forward's arguments by name.
        kind_ids: (B, L) long: the placeholder id at every visual placeholder, -1 elsewhere.
        memo: per-call cache for the adapter description (e.g. its located segments).
    """

    input_ids: Optional[Tensor]
    image_mask: Optional[Tensor]  # (B, L) bool
    has_images: bool
    kwargs: dict
    kind_ids: Optional[Tensor] = None  # (B, L) long
    memo: dict = field(default_factory=dict)

    @classmethod
    def empty(cls) -> "ForwardCall":
        """A call with no inputs (for model-access questions asked at attach time)."""
        return cls(None, None, False, {})
