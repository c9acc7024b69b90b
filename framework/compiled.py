"""`CompiledSelect`: `Pipeline.select` under ``torch.compile`` for fixed-size inputs and int budgets.

Eager ``select`` asks the device a few questions (how many tokens each row keeps, whether a stage has
anything left to do) and its greedy loops run as many steps as the data asks for. A compiled graph
cannot branch on device values, so the compiled select first *plans* every count on the host from
what is static: the batch size, the token count N, the int budget and a budget allocator whose split
depends on the totals only (``BudgetAllocator.plans_from_totals``). The graph then runs the stages
with those counts as Python ints (stages receive ``counts`` as one int for every row), and the
built-in kernels take their sync-free variants (``torch.compiler.is_compiling()``). One graph per
plan: a new budget or N recompiles once.

What compiles, what falls back (docs/performance.md, "Compiled select"):

* compiled, ``fullgraph=True`` (no graph break): the presets ``zspaprune``, ``zspaprune_max``,
  ``zspaprune_attn``, ``fastv``, ``pdrop`` (one drop) and ``divprune``;
* eager fallback, silently and exactly ``Pipeline.select``: inputs with ``visual_mask`` set (padded
  rows have data-dependent counts), float or per-row budgets;
* `SelectCompileError` when the pipeline is compiled: a budget allocator without
  ``plans_from_totals`` (``dynamic``, and the peer allocators ``dart``, ``visionzip``,
  ``vispruner``) while the relevance stage gives scores and the diversity stage adds tokens;
* `SelectCompileError` at the first call with ``fullgraph=True`` when a stage cannot be traced
  without a graph break: seeded generators (``random``), scikit-learn (``zspaprune_kmeans``), Python
  geometry (``zspaprune_grid``, ``pooling``), CDPruner's host-side list of conditioning tokens
  (``cdpruner``); ``fullgraph=False`` compiles the traceable parts.

Compiled picks equal the eager ones except, possibly, between exactly or nearly tied candidates: the
graph's fused kernels (and the compiled farthest-point seed, a full similarity matrix) may round
the last bit differently.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .budget import Budget, validate_budget
from .errors import VtpruneError
from .selection import Selection, assemble_selection, merge_output
from .signals import Signals
from .stages import zero_budget_allowed

#: A `framework.Pipeline` (not imported: pipeline.py imports this module).
Pipeline = Any

__all__ = ["CompiledPipeline", "CompiledSelect", "SelectCompileError", "SelectPlan", "plan_select", "planned_select"]


class SelectCompileError(VtpruneError):
    """A pipeline, or a pipeline on some input, that the compiled select cannot run."""


@dataclass(frozen=True)
class SelectPlan:
    """Every count of one select, known before the graph runs (the same for every row).

    Attributes:
        tokens: N, visual tokens per row (no padding).
        total: tokens kept per row (the budget resolved by the budget allocator).
        critical: tokens chosen by the critical selector per row.
        whole: every row is kept whole (the allocator's `BudgetAllocator.covers`: the keep-all rule of
            ``Pipeline.select``).
    """

    tokens: int
    total: int
    critical: int
    whole: bool = False

    @property
    def remaining(self) -> int:
        """Tokens left to the diversity stage per row."""
        return self.total - self.critical


def _check_plannable(pipeline: Pipeline) -> None:
    """Raise `SelectCompileError` when the pipeline's split needs the device's scores."""
    if pipeline.relevance.gives_scores and pipeline.diversity.adds_tokens and not pipeline.budget.plans_from_totals:
        raise SelectCompileError(
            f"cannot compile {str(pipeline)!r}: budget allocator {pipeline.budget.name!r} does not declare that its "
            "critical/diversity split depends on the totals only (BudgetAllocator.plans_from_totals), so the counts "
            "could depend on the relevance scores, known only on the device (a graph cannot branch on them); "
            "use Pipeline.select, or an allocator that plans from the totals (e.g. 'split')"
        )


def plan_select(pipeline: Pipeline, batch: int, tokens: int, budget: int) -> SelectPlan:
    """The counts of ``pipeline.select`` on ``batch`` unpadded rows of ``tokens`` tokens with an int
    budget, computed on the host (small CPU tensors, no device sync) with the stages' own rules."""
    _check_plannable(pipeline)
    valid_counts = torch.full((batch,), tokens, dtype=torch.long)  # (B,)
    totals = pipeline.budget.resolve(validate_budget(budget, allow_zero=zero_budget_allowed(pipeline)), valid_counts)  # (B,)
    total = int(totals[0]) if batch else 0
    if not pipeline.relevance.gives_scores:
        critical = 0
    elif not pipeline.diversity.adds_tokens:
        critical = total
    else:
        valid = torch.ones(batch, tokens, dtype=torch.bool)  # (B, N)
        allocation = pipeline.budget.allocate(totals, valid, None)
        critical = int(torch.minimum(allocation.critical.clamp(min=0), totals)[0]) if batch else 0
    covered = pipeline.budget.covers(budget, totals, valid_counts)  # (B,) bool or None (host tensors)
    whole = covered is not None and bool(covered.all())
    return SelectPlan(tokens=tokens, total=total, critical=critical, whole=whole)


def planned_select(pipeline: Pipeline, signals: Signals, plan: SelectPlan) -> Selection:
    """`Pipeline.select` on unpadded rows with every count taken from ``plan`` (no host sync).

    Same stage calls as the eager select; counts go to the stages as Python ints.
    """
    valid = signals.valid()  # (B, N) all True
    scores = pipeline.relevance.score(signals)
    if scores is not None:
        scores = scores.float()  # (B, N)
    chosen = torch.zeros_like(valid)  # (B, N)
    if scores is not None and plan.critical > 0:
        chosen = pipeline.critical.select(scores, plan.critical, valid)  # (B, N)
    keep, values = chosen, None
    merged: tuple = (None, None)  # (sizes, assignment) when the diversity stage merges
    if plan.whole:
        keep = valid  # every token is kept (the keep-all rule)
    elif pipeline.diversity.adds_tokens and plan.remaining > 0:
        supplement = pipeline.diversity.supplement(signals, chosen, plan.remaining, valid, scores)
        keep = chosen | supplement.mask  # (B, N)
        if supplement.values is not None:
            values = torch.where(supplement.mask.unsqueeze(-1), supplement.values.to(signals.visual.dtype), signals.visual)  # (B, N, D)
        if supplement.assignment is not None:
            merged = merge_output(keep, supplement.assignment, valid)
    width = plan.tokens if plan.whole else plan.total
    return assemble_selection(keep, chosen, values, width, *merged)


class CompiledSelect:
    """``select(signals, budget)`` compiled with ``torch.compile`` (see the module docstring).

    Build it with `Pipeline.compile`. Calls with an int budget and unpadded ``signals`` run the
    compiled graph; other calls run `Pipeline.select` (identical results, eager speed).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        mode: Optional[str] = None,
        fullgraph: bool = True,
        backend: str = "inductor",
        dynamic: bool = False,
    ) -> None:
        _check_plannable(pipeline)
        self.pipeline = pipeline
        self.fullgraph = fullgraph
        self._graph: Callable[[Signals, SelectPlan], Selection] = torch.compile(
            self._run, mode=mode, fullgraph=fullgraph, backend=backend, dynamic=dynamic
        )

    def _run(self, signals: Signals, plan: SelectPlan) -> Selection:
        return planned_select(self.pipeline, signals, plan)

    def compiles(self, signals: Signals, budget: Budget | Sequence[Budget]) -> bool:
        """Whether this call takes the compiled graph (int budget, no ``visual_mask``; `__call__` drops a
        ``visual_mask`` that is True everywhere first)."""
        return (
            isinstance(budget, numbers.Integral)
            and not isinstance(budget, bool)
            and signals.visual_mask is None
        )

    def __call__(self, signals: Signals, budget: Budget | Sequence[Budget]) -> Selection:
        """Same contract as `Pipeline.select`."""
        if signals.visual_mask is not None and bool(signals.visual_mask.all()):  # adapters always set one
            signals = dataclasses.replace(signals, visual_mask=None)
        if not self.compiles(signals, budget):
            return self.pipeline.select(signals, budget)
        self.pipeline.check_signals(signals)
        plan = plan_select(self.pipeline, signals.batch_size, signals.num_tokens, int(budget))
        try:
            return self._graph(signals, plan)
        except torch._dynamo.exc.TorchDynamoException as error:  # a graph break under fullgraph=True
            raise SelectCompileError(
                f"cannot compile {str(self.pipeline)!r} without a graph break ({type(error).__name__}: "
                f"{str(error).strip().splitlines()[0]}); use Pipeline.select, or Pipeline.compile(fullgraph=False)"
            ) from error

    def __repr__(self) -> str:
        return f"CompiledSelect({str(self.pipeline)!r}, fullgraph={self.fullgraph})"


class CompiledPipeline:
    """A composed `Pipeline` whose ``select`` is its `CompiledSelect` (``framework.prune(..., compile=True)``);
    every other attribute (``placement``, ``requires``, ``stages``, ...) is the pipeline's own."""

    def __init__(self, pipeline: Pipeline, **compile_options: Any) -> None:
        self.pipeline = pipeline
        self.select = pipeline.compile(**compile_options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipeline, name)

    def __str__(self) -> str:
        return str(self.pipeline)

    def __repr__(self) -> str:
        return f"CompiledPipeline({str(self.pipeline)!r})"
