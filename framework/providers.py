"""`signal_providers`: which placements and adapters provide a signal (for error messages).

Imported by `compose` (capability check), `Pipeline.check_signals` and the catalog; it depends on
the registry only, so none of those modules import each other for it.
"""

from __future__ import annotations

from typing import Optional

from .registry import Registry, default_registry

__all__ = ["signal_providers"]


def signal_providers(signal: str, registry: Optional[Registry] = None) -> str:
    """A sentence naming the placements and adapters that provide ``signal``."""
    registry = default_registry(registry)
    placements = sorted(
        name for name, item in registry.stages["placement"].items() if signal in item.obj.provides
    )
    adapters = []
    for name, item in sorted(registry.adapters.items()):
        where = sorted(p for p in item.obj.placements if signal in item.obj.provides(p))
        if where:
            adapters.append(f"{name} at {'/'.join(where)}")
    parts = [f"placements {', '.join(placements)}" if placements else "no placement by itself"]
    if adapters:
        parts.append(f"adapters {'; '.join(adapters)}")
    return "provided by " + " and by ".join(parts)
