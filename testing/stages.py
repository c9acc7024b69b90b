"""Stages for testing adapters and the runtime (not registered by the built-in plugins; use them through
:func:`kit_registry`).

- :class:`NormOrder` (``diversity.norm_order``): keeps the largest-norm tokens and sets `Supplement.order` (the
  order the language model receives them in) **without merged values**, so the adapter must write the kept tokens'
  own values into the image's first placeholder slots in that order. No shipped stage does that (PruMerge's
  official order comes with merged values); adapter authors use it to check that emission path end to end.

>>> from vtprune.framework import compose
>>> str(compose("relevance.none+critical+norm_order+split(critical=0.0)+pre_llm", registry=kit_registry()))
'relevance.none+critical+norm_order+split(critical=0.0)+pre_llm'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from vtprune.framework import Registry, Signals, build_registry, hookimpl
from vtprune.framework.stages import DiversitySupplementer, Supplement

__all__ = ["NormOrder", "KIT_STAGES", "KitStages", "kit_registry", "norm_emission"]


def norm_emission(visual: Tensor, kept: Tensor) -> Tensor:
    """(B, N) long: each kept token's emission rank, by descending L2 norm of ``visual`` (B, N, D) among the row's
    ``kept`` (B, N) bool tokens (ties: the earlier position first); -1 at the other tokens."""
    norms = visual.float().norm(dim=-1)  # (B, N)
    key = torch.where(kept, norms, torch.full_like(norms, -torch.inf))  # (B, N)
    by_rank = key.sort(dim=1, descending=True, stable=True).indices  # (B, N): position of each rank
    ranks = torch.empty_like(by_rank).scatter_(1, by_rank, torch.arange(key.shape[1], device=key.device).expand_as(by_rank))
    return torch.where(kept, ranks, torch.full_like(ranks, -1))  # (B, N)


@dataclass(frozen=True, eq=False)
class NormOrder(DiversitySupplementer):
    """Adds each row's ``counts[b]`` largest-norm remaining tokens (ties: the earlier position) and hands the language
    model every kept token, the already selected ones included, in descending norm order (`norm_emission`): a
    `Supplement.order` and no ``values``. Rows are independent; the count is exact."""

    name: ClassVar[str] = "norm_order"
    description: ClassVar[str] = "test stage: largest-norm tokens, emitted in descending norm order (order, no values)"

    def supplement(
        self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]
    ) -> Supplement:
        candidates = valid & ~selected  # (B, N)
        norms = signals.visual.float().norm(dim=-1)  # (B, N)
        key = torch.where(candidates, norms, torch.full_like(norms, -torch.inf))  # (B, N)
        by_rank = key.sort(dim=1, descending=True, stable=True).indices  # (B, N)
        take = torch.arange(key.shape[1], device=key.device).unsqueeze(0) < counts.unsqueeze(1)  # (B, N) in rank order
        mask = torch.zeros_like(valid).scatter_(1, by_rank, take)  # (B, N)
        return Supplement(mask, order=norm_emission(signals.visual, mask | selected))


#: The kit's stage classes.
KIT_STAGES: tuple[type, ...] = (NormOrder,)


class KitStages:
    """The plugin registering the kit's stages (``build_registry(plugins=[KitStages()])``)."""

    @hookimpl
    def vtprune_register_stages(self, registry: Registry) -> None:
        for cls in KIT_STAGES:
            registry.add_stage(cls)


def kit_registry(autoload: bool = False) -> Registry:
    """A registry of the built-in plugins (and, with ``autoload``, the installed ones) plus the kit's stages."""
    return build_registry(autoload=autoload, plugins=[KitStages()])
