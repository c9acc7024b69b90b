"""Layer placements: where selection happens. Data that adapters act on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vtprune.framework.signals import PLACEMENT_SIGNALS
from vtprune.framework.stages import Drop, LayerPlacement

__all__ = ["PreLLM", "AtLayer", "Schedule", "VisionOutput"]


@dataclass(frozen=True, eq=False)
class PreLLM(LayerPlacement):
    """Before decoder layer 0, on the projected visual tokens."""

    name: ClassVar[str] = "pre_llm"
    description: ClassVar[str] = "select on the projected visual tokens before the first decoder layer"
    provides: ClassVar[frozenset[str]] = PLACEMENT_SIGNALS["pre_llm"]

    def drops(self, budget: int | float) -> tuple[Drop, ...]:
        return (Drop("pre_llm", None, budget),)


@dataclass(frozen=True, eq=False)
class AtLayer(LayerPlacement):
    """Inside the language model: layers < k see every token; tokens are dropped before layer k."""

    name: ClassVar[str] = "layer"
    description: ClassVar[str] = "drop before decoder layer k using layer k-1's attention, keys and hidden states"
    provides: ClassVar[frozenset[str]] = PLACEMENT_SIGNALS["layer"]
    k: int = 2

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1 (k = 0 is the pre_llm placement), got {self.k}")

    def drops(self, budget: int | float) -> tuple[Drop, ...]:
        return (Drop("layer", self.k, budget),)


@dataclass(frozen=True, eq=False)
class Schedule(LayerPlacement):
    """Several drops inside the language model (PyramidDrop style).

    The first drop (before ``layers[0]``) keeps the requested budget; each later drop keeps
    ``ratio`` of the image tokens still present. ``{2: 0.5, 8: 0.25}`` of the original tokens is
    ``schedule(layers=[2, 8], ratio=0.5)`` with budget 0.5.
    """

    name: ClassVar[str] = "schedule"
    description: ClassVar[str] = "several in-LLM drops: the budget at layers[0], then `ratio` of what remains at each later layer"
    provides: ClassVar[frozenset[str]] = PLACEMENT_SIGNALS["schedule"]
    layers: tuple[int, ...] = (8, 16, 24)
    ratio: float = 0.5

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("layers must name at least one decoder layer")
        if any(k < 1 for k in self.layers) or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be strictly increasing and >= 1, got {list(self.layers)}")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")

    def drops(self, budget: int | float) -> tuple[Drop, ...]:
        first = Drop("layer", self.layers[0], budget)
        return (first, *(Drop("layer", k, self.ratio) for k in self.layers[1:]))


@dataclass(frozen=True, eq=False)
class VisionOutput(LayerPlacement):
    """On the vision encoder's output tokens, before the projector."""

    name: ClassVar[str] = "vision"
    description: ClassVar[str] = "select on the vision encoder's output tokens before the projector"
    provides: ClassVar[frozenset[str]] = PLACEMENT_SIGNALS["vision"]

    def drops(self, budget: int | float) -> tuple[Drop, ...]:
        return (Drop("vision", None, budget),)
