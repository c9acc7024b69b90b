"""`Pipeline`: one stage of each kind, and the selection algorithm that runs them."""

from __future__ import annotations

import numbers
import typing
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from .budget import Budget, validate_budget
from .errors import BudgetError, MissingSignalError
from .providers import signal_providers
from .recipe import format_term
from .selection import Selection, selection_from_masks
from .signals import ALWAYS_PRESENT, Signals
from .stages import (
    STAGE_KINDS,
    BudgetAllocator,
    CriticalSelector,
    DiversitySupplementer,
    LayerPlacement,
    RelevanceScorer,
    Stage,
    stage_params,
)

__all__ = ["Pipeline", "ALWAYS_PRESENT"]


@dataclass(frozen=True)
class Pipeline:
    """A composed pruning method: one stage of each kind.

    Build it with ``framework.compose``; ``str(pipeline)`` is the canonical recipe, which
    ``compose`` parses back to an equal pipeline. Equality compares the stages and their
    parameters only.
    """

    relevance: RelevanceScorer
    critical: CriticalSelector
    diversity: DiversitySupplementer
    budget: BudgetAllocator
    placement: LayerPlacement
    preset: Optional[str] = field(default=None, compare=False)
    #: Stage names that must be written ``kind.name`` in recipes (ambiguous or preset names).
    qualified: frozenset[str] = field(default=frozenset(), compare=False)

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The five stages in canonical order."""
        return tuple(getattr(self, kind) for kind in STAGE_KINDS)

    @property
    def requires(self) -> frozenset[str]:
        """Every `Signals` field the stages read (``visual`` included)."""
        needed = {"visual"}
        for stage in self.stages:
            needed |= stage.requires
        return frozenset(needed)

    def __str__(self) -> str:
        terms = []
        for stage in self.stages:
            kind = stage.kind if stage.name in self.qualified else None
            terms.append(format_term(stage.name, _recipe_params(stage), kind))
        return "+".join(terms)

    def to_dict(self) -> dict[str, dict]:
        """The dict form accepted by ``compose`` (for YAML and logging)."""
        return {stage.kind: {"name": stage.name, **_recipe_params(stage)} for stage in self.stages}

    # -- selection -----------------------------------------------------------------------------

    def check_signals(self, signals: Signals) -> None:
        """Raise `MissingSignalError` naming every required signal that ``signals`` lacks."""
        missing = sorted(self.requires - signals.present())
        if missing:
            lines = []
            for name in missing:
                users = [s.name for s in self.stages if name in s.requires]
                lines.append(f"  {name!r} (needed by {', '.join(users)}): {signal_providers(name)}")
            raise MissingSignalError(
                f"the pruning point (placement {self.placement.name!r}) did not provide:\n" + "\n".join(lines)
            )

    def select(self, signals: Signals, budget: Budget | Sequence[Budget]) -> Selection:
        """Choose the visual tokens each row keeps.

        Args:
            signals: what the pruning point sees; rows are independent images.
            budget: an int (tokens kept per row), a float in (0, 1] (fraction of the row's real
                tokens), or a sequence of those with one entry per row. A budget at or above a
                row's real token count keeps every real token.
        Returns: a `Selection` with ``counts[b] == resolved budget of row b`` (never more than
            the row's real tokens), ascending unique indices, padding never selected, and
            ``critical`` marking the tokens the critical selector chose.
        """
        self.check_signals(signals)
        valid = signals.valid()  # (B, N)
        valid_counts = valid.sum(dim=1)  # (B,)
        totals = self._resolve(budget, valid_counts)  # (B,)
        scores = self.relevance.score(signals)
        if scores is not None:
            scores = scores.float().masked_fill(~valid, float("-inf"))  # (B, N)
        allocation = self.budget.allocate(totals, valid, scores)
        critical_counts = allocation.critical.clamp(min=0)
        critical_counts = torch.minimum(critical_counts, totals)
        if scores is None:
            critical_counts = torch.zeros_like(totals)
        elif not self.diversity.adds_tokens:
            critical_counts = totals
        chosen = torch.zeros_like(valid)
        if bool((critical_counts > 0).any()):
            chosen = self.critical.select(scores, critical_counts, valid) & valid  # (B, N)
        remaining = totals - chosen.sum(dim=1)  # (B,)
        values = None
        keep = chosen
        if bool((remaining == (valid & ~chosen).sum(dim=1)).all()):
            keep = valid  # every remaining real token is kept: nothing for the diversity stage to choose
        elif bool((remaining > 0).any()):
            supplement = self.diversity.supplement(signals, chosen, remaining, valid, scores)
            keep = chosen | (supplement.mask & valid & ~chosen)
            if supplement.values is not None:
                values = torch.where(supplement.mask.unsqueeze(-1), supplement.values.to(signals.visual.dtype), signals.visual)  # (B, N, D)
        return selection_from_masks(keep, chosen, values)

    def _resolve(self, budget: Budget | Sequence[Budget], valid_counts: Tensor) -> Tensor:
        if isinstance(budget, (numbers.Real,)) and not isinstance(budget, bool):
            return self.budget.resolve(validate_budget(budget), valid_counts)
        if isinstance(budget, Sequence) and not isinstance(budget, str):
            if len(budget) != valid_counts.shape[0]:
                raise BudgetError(
                    f"a per-row budget needs one entry per row: got {len(budget)} for {valid_counts.shape[0]} rows"
                )
            rows = [self.budget.resolve(validate_budget(b), valid_counts[i : i + 1]) for i, b in enumerate(budget)]
            return torch.cat(rows)
        validate_budget(budget)  # raises with the standard message
        raise AssertionError("unreachable")


def _recipe_params(stage: Stage) -> dict:
    """Parameters as recipe values: dict-typed ones (stored as sorted pairs) back to dicts,
    sequences as lists."""
    out = {}
    for spec in stage_params(type(stage)):
        value = getattr(stage, spec.name)
        if isinstance(value, tuple):
            value = dict(value) if typing.get_origin(spec.annotation) is dict else list(value)
        out[spec.name] = value
    return out
