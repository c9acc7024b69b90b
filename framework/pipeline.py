"""`Pipeline`: one stage of each kind, and the selection algorithm that runs them."""

from __future__ import annotations

import functools
import numbers
import typing
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from .budget import Budget, validate_budget
from .compiled import CompiledSelect
from .dense import index_path_applies, index_path_select
from .errors import BudgetError, MissingSignalError
from .providers import signal_providers
from .recipe import format_term
from .selection import Selection, assemble_selection, merge_output
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

    @functools.cached_property
    def requires(self) -> frozenset[str]:
        """Every `Signals` field the stages read (``visual`` included); computed once (stages are frozen)."""
        needed = {"visual"}
        for stage in self.stages:
            needed |= stage.requires
        return frozenset(needed)

    @property
    def optional(self) -> frozenset[str]:
        """The `Signals` fields some stage uses when present (``Stage.optional``), less the required ones."""
        used: set[str] = set()
        for stage in self.stages:
            used |= stage.optional
        return frozenset(used) - self.requires

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

    @functools.cached_property
    def _index_path(self) -> bool:
        """Whether ``select`` may take the index path (framework/dense.py); a fact of the stages."""
        return index_path_applies(self)

    def check_signals(self, signals: Signals) -> None:
        """Raise `MissingSignalError` naming every required signal that ``signals`` lacks."""
        if all(getattr(signals, name, None) is not None for name in self.requires):
            return  # the common case, O(len(requires))
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
                tokens), or a sequence of those with one entry per row.
        Returns: a `Selection` with ``counts[b] == resolved budget of row b`` (never more than
            the row's real tokens; for an allocator with ``adaptive_counts``, its adaptive
            ``Allocation.total``, at most that; for a diversity stage with ``exact_counts = False``, what
            it keeps, at most that), ascending unique indices, padding never selected, and ``critical``
            marking the tokens the critical selector chose.

        The keep-all rule, per row and for every pipeline: a row the allocator says its budget covers
        (`BudgetAllocator.covers`; by default a budget at or above the row's real tokens) keeps every real
        token with its own value, nothing merged into it, whatever the stages would do, so a row is the same
        alone and in any batch and keep-all reproduces the unpruned model (docs/architecture.md, "Keep-all").
        """
        self.check_signals(signals)
        if self._index_path:
            selection = index_path_select(self, signals, budget)
            if selection is not None:
                return selection
        dense = signals.visual_mask is None  # every token is real: nothing to mask
        valid = signals.valid()  # (B, N)
        batch, tokens = valid.shape
        if dense:
            valid_counts = torch.full((batch,), tokens, dtype=torch.long, device=valid.device)  # (B,)
        else:
            valid_counts = valid.sum(dim=1)  # (B,)
        totals = self._resolve(budget, valid_counts)  # (B,)
        covered = self.budget.covers(budget, totals, valid_counts)  # (B,) bool, or None: no row kept whole
        whole = 0 if covered is None else int(covered.sum().item())  # rows kept whole (one sync)
        scores = self.relevance.score(signals)
        if scores is not None:
            scores = scores.float()  # (B, N)
            if not dense:
                scores = scores.masked_fill(~valid, float("-inf"))  # (B, N)
        if self.budget.adaptive_counts:
            # the kept count comes from the data (docs/architecture.md, "Adaptive counts")
            allocation = self.budget.adapt(signals, budget, totals, valid, scores)
            adapted = torch.minimum(allocation.total.clamp(min=0), totals)  # (B,)
            critical_counts = torch.minimum(allocation.critical.clamp(min=0), adapted)  # (B,)
            totals = torch.where(covered, totals, adapted) if whole else adapted  # (B,): covered rows keep all
            if scores is None:
                critical_counts = None
            elif not self.diversity.adds_tokens:
                critical_counts = totals
        elif scores is None:
            critical_counts = None  # nothing is critical without scores
        elif not self.diversity.adds_tokens:
            critical_counts = totals  # the critical selector fills the whole budget
        else:
            allocation = self.budget.allocate(totals, valid, scores)  # only the split is read
            critical_counts = torch.minimum(allocation.critical.clamp(min=0), totals)  # (B,)
        chosen = None
        if critical_counts is not None and bool(critical_counts.any()):  # counts are >= 0
            chosen = self.critical.select(scores, critical_counts, valid)  # (B, N)
            if not dense:
                chosen = chosen & valid
        if chosen is None:
            chosen = torch.zeros_like(valid)  # (B, N)
        values = None
        assigned: Optional[Tensor] = None  # (B, N) position each token is merged into, when a stage merges
        order: Optional[Tensor] = None  # (B, N) emission rank of each kept token, when a stage sets one
        keep = chosen
        if whole == batch:
            keep = valid  # every row covered: every real token, nothing for diversity to choose
        else:
            full = covered.unsqueeze(-1) if whole else None  # (B, 1): the rows kept whole, when there are some
            if self.diversity.adds_tokens:
                remaining = totals - chosen.sum(dim=1)  # (B,)
                if bool((remaining > 0).any()):
                    supplement = self.diversity.supplement(signals, chosen, remaining, valid, scores)
                    mask, assigned, replaced = supplement.mask, supplement.assignment, supplement.mask
                    order = supplement.order
                    if full is not None:  # covered rows keep their own values, nothing merged into them
                        replaced = replaced & ~full  # (B, N)
                        if assigned is not None:
                            assigned = torch.where(full, torch.full_like(assigned, -1), assigned)  # (B, N)
                    keep = chosen | (mask if dense else mask & valid)  # (B, N)
                    if supplement.values is not None:
                        values = torch.where(replaced.unsqueeze(-1), supplement.values.to(signals.visual.dtype), signals.visual)  # (B, N, D)
            if full is not None:
                keep = torch.where(full, valid, keep)  # (B, N)
                if order is not None:  # covered rows: ascending positions, the unpruned order
                    order = torch.where(full, valid.long().cumsum(1) - 1, order)  # (B, N)
        merged = merge_output(keep, assigned, valid) if assigned is not None else None  # (sizes, assignment)
        if not keep.numel():
            width = 0
        elif keep is valid and dense:
            width = tokens  # every row keeps all its tokens: no need to count them
        else:
            width = int(keep.sum(dim=1).max().item())
        sizes, assignment = merged if merged is not None else (None, None)
        return assemble_selection(keep, chosen, values, width, sizes, assignment, order)

    def compile(
        self, *, mode: Optional[str] = None, fullgraph: bool = True, backend: str = "inductor", dynamic: bool = False
    ) -> CompiledSelect:
        """``select`` compiled with ``torch.compile`` for fixed-size inputs and int budgets.

        Returns a `CompiledSelect`, called like ``select(signals, budget)``. With an int budget and
        no ``visual_mask`` it runs one compiled graph per (shapes, budget), every count planned on
        the host (no device sync); other calls fall back to ``select``. ``mode``, ``fullgraph``,
        ``backend`` and ``dynamic`` go to ``torch.compile`` (on a GPU, ``mode="reduce-overhead"``
        replays the graph as a CUDA graph). Raises `SelectCompileError` for a pipeline whose split
        depends on the scores, and at the first call when ``fullgraph`` and a stage cannot be traced
        without a graph break. See framework/compiled.py for what compiles.
        """
        return CompiledSelect(self, mode=mode, fullgraph=fullgraph, backend=backend, dynamic=dynamic)

    def _resolve(self, budget: Budget | Sequence[Budget], valid_counts: Tensor) -> Tensor:
        zero = self.placement.accepts_zero_budget  # the count 0: only where the placement withdraws every token
        if isinstance(budget, (numbers.Real,)) and not isinstance(budget, bool):
            return self.budget.resolve(validate_budget(budget, allow_zero=zero), valid_counts)
        if isinstance(budget, Sequence) and not isinstance(budget, str):
            if len(budget) != valid_counts.shape[0]:
                raise BudgetError(
                    f"a per-row budget needs one entry per row: got {len(budget)} for {valid_counts.shape[0]} rows"
                )
            rows = [self.budget.resolve(validate_budget(b, allow_zero=zero), valid_counts[i : i + 1]) for i, b in enumerate(budget)]
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
