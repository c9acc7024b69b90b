"""Placement data that adapters act on: re-exported here for adapter authors."""

from __future__ import annotations

from .signals import DROP_SIGNALS
from .stages import Drop, LayerPlacement

__all__ = ["Drop", "LayerPlacement", "PLACEMENT_WHERE"]

#: The kinds of drop point an adapter may be asked to implement.
PLACEMENT_WHERE: tuple[str, ...] = tuple(DROP_SIGNALS)
