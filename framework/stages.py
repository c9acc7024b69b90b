"""The five stage kinds: base classes whose method docstrings are the contracts.

A stage class is registered by ``name`` under its ``kind``. Its parameters are the keyword
arguments of ``__init__`` (each with a type hint and a default); the framework reads them to parse
recipes, validate values, build the catalog and print canonical recipes, so a stage never parses
its own configuration. Stages hold no state between calls apart from their parameters.

Every method works on a whole batch. Rows are independent: a stage may not compute a statistic
over several rows, so a row's result does not depend on the batch it is in.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from .budget import resolve_budget, resolve_count
from .signals import Signals

__all__ = [
    "STAGE_KINDS",
    "Stage",
    "RelevanceScorer",
    "CriticalSelector",
    "DiversitySupplementer",
    "Supplement",
    "BudgetAllocator",
    "Allocation",
    "LayerPlacement",
    "Drop",
    "ParamSpec",
    "stage_params",
    "is_stochastic",
    "pipeline_at_drop",
    "zero_budget_allowed",
]

#: The stage kinds in canonical recipe order.
STAGE_KINDS: tuple[str, ...] = ("relevance", "critical", "diversity", "budget", "placement")


@dataclass(frozen=True)
class ParamSpec:
    """One stage parameter: its name, type hint, default and (for Literal types) the choices."""

    name: str
    annotation: Any
    default: Any

    @property
    def type_name(self) -> str:
        return getattr(self.annotation, "__name__", None) or str(self.annotation).replace("typing.", "")


def stage_params(cls: type) -> tuple[ParamSpec, ...]:
    """The parameters of a stage class, read from the keyword arguments of its ``__init__``."""
    if cls.__init__ is object.__init__:
        return ()
    signature = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(cls.__init__)
    specs = []
    for param in signature.parameters.values():
        if param.name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.default is inspect.Parameter.empty:
            raise TypeError(f"stage {cls.__name__}: parameter {param.name!r} needs a default")
        if param.name not in hints:
            raise TypeError(f"stage {cls.__name__}: parameter {param.name!r} needs a type hint")
        specs.append(ParamSpec(param.name, hints[param.name], param.default))
    return tuple(specs)


def is_stochastic(stage: Any) -> bool:
    """Whether a stage (class or instance) draws random numbers: its ``stochastic`` attribute, or,
    where that is None, whether it has a ``seed`` parameter."""
    cls = stage if isinstance(stage, type) else type(stage)
    declared = getattr(cls, "stochastic", None)
    if declared is not None:
        return bool(declared)
    return any(spec.name == "seed" for spec in stage_params(cls))


class Stage:
    """Common base of every stage.

    Class attributes a subclass sets:
        name: the registry name used in recipes (lower_snake_case).
        description: one line for the catalog.
        requires: the `Signals` fields the stage reads (besides ``visual`` and ``visual_mask``).
        optional: the `Signals` fields the stage uses when an adapter provides them and does without
            otherwise, as its docstring says (e.g. ``frames``: a row without frames is one frame).
        stochastic: whether the stage draws random numbers (so a run repeated with another seed
            can select differently); None (default) = derived: True when the stage has a ``seed``
            parameter (`is_stochastic`). Experiment grids repeat only stochastic cells per seed.
    """

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    optional: ClassVar[frozenset[str]] = frozenset()
    #: How an adapter should compute the signals this stage reads, when a method's official code fixes it
    #: (docs/adapters.md, "Adapter hints"; the names are `vtprune.framework.hints`' constants): "final_norm" = in-LLM ``visual`` / ``prompt`` are the hidden states
    #: through the decoder's final norm (DART); "own_layer_scoring" = a ``layer(k)`` drop's ``attention`` /
    #: keys come from layer k's own weights on its input instead of layer k-1's (PyramidDrop). Adapters that
    #: do not know a hint ignore it.
    adapter_hints: ClassVar[frozenset[str]] = frozenset()
    stochastic: ClassVar[Optional[bool]] = None

    @property
    def params(self) -> dict[str, Any]:
        """The values of this instance's parameters, by name."""
        return {spec.name: getattr(self, spec.name) for spec in stage_params(type(self))}

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.params == other.params  # type: ignore[union-attr]

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted((k, repr(v)) for k, v in self.params.items()))))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({inner})"


class RelevanceScorer(Stage):
    """Stage 1: how relevant each visual token is to the task."""

    kind = "relevance"
    #: False for a scorer that never gives scores (then compose rejects a diversity stage that adds nothing).
    gives_scores: ClassVar[bool] = True

    def score(self, signals: Signals) -> Optional[Tensor]:
        """Score every visual token.

        Returns (B, N) float32, higher = more relevant, or None when this scorer gives no scores
        (then no token is chosen as critical and the whole budget goes to the diversity stage).
        Values at padding positions are ignored.
        """
        raise NotImplementedError


class CriticalSelector(Stage):
    """Stage 2: picks the task-critical tokens from the relevance scores."""

    kind = "critical"

    def select(self, scores: Tensor, counts: Tensor, valid: Tensor) -> Tensor:
        """Choose ``counts[b]`` real tokens of row b.

        Args:
            scores: (B, N) float32 relevance scores.
            counts: (B,) long, 0 <= counts[b] <= valid[b].sum().
            valid: (B, N) bool, the real tokens.
        Returns: (B, N) bool with exactly ``counts[b]`` True entries in row b, all at real tokens.
        """
        raise NotImplementedError

    def select_indices(self, scores: Tensor, count: int) -> Optional[Tensor]:
        """Optional index form of :meth:`select` for unpadded rows that all keep ``count`` tokens.

        ``Pipeline.select`` calls it when every token is real, the budget is one int and the critical
        selector fills the whole budget (FastV, PyramidDrop): it saves building and sorting a (B, N) mask.

        Args:
            scores: (B, N) float32 relevance scores, every token real.
            count: tokens to keep per row, ``0 < count < N``.
        Returns: (B, count) long, row b's kept positions in ascending order, exactly the True positions of
            ``select(scores, count, all-True valid)``; or None when the selector has no index form (the
            default: the pipeline then calls :meth:`select`).
        """
        return None


@dataclass(frozen=True)
class Supplement:
    """What a diversity supplementer adds.

    Attributes:
        mask: (B, N) bool, the newly chosen tokens (disjoint from the already selected set).
        values: (B, N, D) or None. For merge-style stages: replacement values, read only at the
            positions in ``mask`` (e.g. a centre token plus the tokens merged into it).
        assignment: (B, N) long or None (merging output): for every token of the row, the *position* of the
            kept token it was merged into (a token of ``mask`` or an already selected one), or -1 when it was
            dropped without being merged. A token of ``mask`` is assigned its own position. ``Pipeline.select``
            turns positions into `Selection` slots and derives ``Selection.sizes`` by counting; kept tokens
            nothing was merged into stand for themselves.
        order: (B, N) long or None: the order in which the language model receives the row's kept tokens, as each
            kept token's rank (0 = first; read at every kept position, the already selected ones included; a
            permutation of 0..count-1 per row); None = ascending positions. It becomes ``Selection.order``.
    """

    mask: Tensor  # (B, N) bool
    values: Optional[Tensor] = None  # (B, N, D)
    assignment: Optional[Tensor] = None  # (B, N) long
    order: Optional[Tensor] = None  # (B, N) long


class DiversitySupplementer(Stage):
    """Stage 3: fills the rest of the budget with tokens that cover what the critical set misses."""

    kind = "diversity"
    #: False for a supplementer that never adds tokens: the critical selector then fills the budget.
    adds_tokens: ClassVar[bool] = True

    def supplement(
        self,
        signals: Signals,
        selected: Tensor,
        counts: Tensor,
        valid: Tensor,
        scores: Optional[Tensor],
    ) -> Supplement:
        """Choose ``counts[b]`` more real tokens of row b, none of them already selected.

        Args:
            signals: what the pruning point sees.
            selected: (B, N) bool, the tokens already chosen (the critical set).
            counts: (B,) long, how many to add; never more than the unselected real tokens.
            valid: (B, N) bool, the real tokens.
            scores: (B, N) float32 relevance scores, or None.
        Returns: a `Supplement` whose mask has exactly ``counts[b]`` True entries in row b.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class Allocation:
    """Per-row token counts: ``total`` kept, of which ``critical`` from the critical selector."""

    total: Tensor  # (B,) long
    critical: Tensor  # (B,) long


class BudgetAllocator(Stage):
    """Stage 4: turns the requested budget into per-row totals and the critical/diversity split."""

    kind = "budget"
    #: False for an allocator that keeps no token of a row its budget does not cover (VTW's ``withdraw``): the pipeline
    #: then needs no relevance or diversity stage that selects (``compose`` accepts ``relevance.none`` + ``diversity.none``).
    keeps_tokens: ClassVar[bool] = True
    #: True when ``allocate`` reads ``totals`` only (never ``valid`` or ``scores``): a compiled select
    #: (`Pipeline.compile`) then knows the critical/diversity split before its graph runs.
    plans_from_totals: ClassVar[bool] = False
    #: True for an allocator whose kept count comes from the data (SparseVLM's rank rule, MustDrop's thresholds):
    #: ``Pipeline.select`` then calls :meth:`adapt` instead of :meth:`allocate` and keeps ``Allocation.total``
    #: tokens per row (at most the resolved total). Instances may override it with a property.
    adaptive_counts: ClassVar[bool] = False
    #: The budgets that are settings rather than counts, when only those are valid (SparseVLM's official targets 64 /
    #: 128 / 192 without scale/bias): the contract kit (`vtprune.testing`) sweeps them instead of its count budgets.
    #: Empty: any budget is a count. Instances may override it with a property.
    budget_settings: ClassVar[tuple[int | float, ...]] = ()

    def adapt(self, signals: Signals, budget: Any, totals: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Allocation:
        """Adaptive allocators only (``adaptive_counts``): the data-dependent split.

        Args:
            signals: what the pruning point sees.
            budget: the requested budget as ``Pipeline.select`` received it (an int, a float, or one per row): the
                allocator's documented target / parameter (e.g. the official scale and bias of that budget).
            totals: (B,) long, the most tokens each row may keep (:meth:`resolve`).
            valid, scores: as in :meth:`allocate`.
        Returns: an `Allocation` with ``0 <= critical <= total <= totals``: ``total`` is the row's adaptive count.
        """
        raise NotImplementedError

    def allocate(self, totals: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Allocation:
        """Split each row's total.

        Args:
            totals: (B,) long, tokens to keep per row, already resolved from the requested budget by
                :meth:`resolve` (``min(budget, valid)`` for a count, the rounded fraction otherwise).
            valid: (B, N) bool.
            scores: (B, N) float32 relevance scores, or None.
        Returns: an `Allocation` with ``0 <= critical <= total``.
        """
        raise NotImplementedError

    #: How a fraction budget rounds (`framework.budget.ROUNDINGS`), for the default :meth:`resolve` and
    #: :meth:`resolve_count`: "half_up" (``floor(f * valid + 0.5)``), or another method's rule ("half_even": Python
    #: ``round``; "floor": ``int()`` truncation; "ceil").
    rounding: ClassVar[str] = "half_up"

    def resolve(self, budget: int | float, valid_counts: Tensor) -> Tensor:
        """(B,) long: tokens to keep per row for the requested budget.

        The default rule: an int keeps ``min(budget, valid)``; a float f in (0, 1] keeps ``rounding(f * valid)``, at
        least one token (``resolve_budget(budget, valid_counts, rounding=self.rounding)``). Allocators that
        reproduce another method's rounding set :attr:`rounding`; a count of another kind overrides this.
        """
        return resolve_budget(budget, valid_counts, rounding=self.rounding)

    def covers(self, budget: Any, totals: Tensor, valid_counts: Tensor) -> Optional[Tensor]:
        """(B,) bool: the rows whose budget asks for every real token, or None when no row's can.

        ``Pipeline.select`` keeps a covered row whole: every real token, its own value, nothing merged, whatever the
        diversity stage or an adaptive split would do (so keep-all reproduces the unpruned model, and a row is the
        same in any batch). The default: the resolved total reaches the row's real tokens (``totals`` from
        :meth:`resolve`, ``valid_counts`` (B,) long). An allocator whose budget is a setting rather than a count
        overrides it (SparseVLM's official targets; PruneVid's cap, which 1.0 lifts: None).

        Args:
            budget: the requested budget as ``Pipeline.select`` received it (an int, a float, or one per row).
            totals: (B,) long, :meth:`resolve` of it.
            valid_counts: (B,) long, real tokens per row.
        """
        return totals >= valid_counts  # (B,)

    def resolve_count(self, budget: int | float, tokens: int) -> int:
        """:meth:`resolve` for one row of ``tokens`` real tokens, as a Python int (the index path of
        ``Pipeline.select`` asks it on the host): ``resolve_count(..., rounding=self.rounding)`` (no tensor op)
        while :meth:`resolve` is the default, else :meth:`resolve` on a one-element tensor, so it follows any
        override (tests/framework/test_dense_select.py checks that both agree for every allocator)."""
        if type(self).resolve is BudgetAllocator.resolve:
            return resolve_count(budget, tokens, rounding=self.rounding)
        return int(self.resolve(budget, torch.full((1,), tokens, dtype=torch.long)).tolist()[0])


@dataclass(frozen=True)
class Drop:
    """One point where tokens are dropped.

    Attributes:
        where: "vision" (vision-encoder output, before the projector), "pre_llm" (projected
            tokens before decoder layer 0), "layer" (inside the language model) or "vision_layers"
            (inside the vision tower, progressively across its layers; the LLM receives the reduced sequence).
        layer: for "layer", the decoder layer k before which tokens are dropped: layers < k see the
            full sequence and scoring signals come from layer k - 1. None otherwise.
        budget: int = visual tokens kept per image; float in (0, 1] = fraction of the image's
            tokens still present at this point.
    """

    where: str
    layer: Optional[int]
    budget: int | float


class LayerPlacement(Stage):
    """Stage 5: where in the model selection happens, and which signals that point can provide.

    Placement is data: adapters read :meth:`drops` and act on it.
    """

    kind = "placement"
    #: Signals every adapter can provide at this placement (adapters may add more).
    provides: ClassVar[frozenset[str]] = frozenset()
    #: True where the budget 0 is meaningful: an in-LLM drop that withdraws every visual token while the text goes on
    #: (``withdraw``, VTW). `framework.prune`, the runtime's budget and `Pipeline.select` then accept the count 0
    #: (`zero_budget_allowed`); everywhere else it is a `BudgetError` naming this placement.
    accepts_zero_budget: ClassVar[bool] = False
    #: True for a placement whose ``layer`` drop may sit after the last decoder layer (``withdraw(k=num_layers)``): no
    #: layer runs after it, so nothing is dropped (the unpruned model). Others must drop before a layer 1..num_layers-1.
    drops_after_last_layer: ClassVar[bool] = False

    def drops(self, budget: int | float) -> tuple[Drop, ...]:
        """The drop points, in model order, for a requested budget (int or float, validated)."""
        raise NotImplementedError

    def drop_pipeline(self, pipeline: Any, number: int) -> Any:
        """The pipeline that selects at drop ``number`` (0-based, in :meth:`drops` order): ``pipeline`` itself by
        default. A placement whose later drop runs another step of its method (HoliTom's inner-LLM merge) returns
        ``pipeline`` with that step's stages swapped in; adapters collect the signals of every drop's pipeline."""
        return pipeline


def zero_budget_allowed(pipeline: Any) -> bool:
    """Whether ``pipeline``'s placement accepts the budget 0 (`LayerPlacement.accepts_zero_budget`; False for a
    duck-typed placement without the attribute)."""
    return bool(getattr(getattr(pipeline, "placement", None), "accepts_zero_budget", False))


def pipeline_at_drop(pipeline: Any, number: int) -> Any:
    """The pipeline selecting at drop ``number`` of ``pipeline.placement``: the placement's ``drop_pipeline`` where it
    has one (any `LayerPlacement`), else ``pipeline`` itself (a duck-typed placement with ``drops`` only)."""
    method = getattr(pipeline.placement, "drop_pipeline", None)
    return pipeline if method is None else method(pipeline, number)
