"""A complete third-party vtprune plugin: one relevance stage and one preset, in one file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from vtprune.framework import RelevanceScorer, Signals, hookimpl


@dataclass(frozen=True, eq=False)
class TokenNorm(RelevanceScorer):
    """Scores each visual token by its L2 norm (large-norm tokens often carry more information)."""

    name: ClassVar[str] = "token_norm"
    description: ClassVar[str] = "L2 norm of each visual token (optionally raised to a power)"
    power: float = 1.0

    def score(self, signals: Signals) -> Tensor:
        return signals.visual.float().norm(dim=-1) ** self.power  # (B, N)


@hookimpl
def vtprune_register_stages(registry) -> None:
    registry.add_stage(TokenNorm)


@hookimpl
def vtprune_register_presets(registry) -> None:
    registry.add_preset("norm_fps", "token_norm+critical+fps+split(critical=0.5)", "norm top-k plus farthest point")
