"""The selection contract on one batch and one budget: :func:`check_selection` and :class:`ContractError`.

The rules are those of ``Pipeline.select`` and the stage base classes (``framework/pipeline.py``,
``framework/stages.py``); `vtprune.testing.contracts` runs them over sweeps of batches and budgets:

=========================  =====================================================================================
property                   rule
=========================  =====================================================================================
``select runs``            ``select`` raises nothing on any of the batches below
``selection shapes``       ``indices`` (B, K) long, ``mask`` / ``critical`` (B, K) bool, ``mask`` a prefix per row
``exact count``            ``counts[b] == pipeline.budget.resolve(budget, real tokens of row b)`` (an adaptive
                           allocator with an exact diversity stage: its ``Allocation.total``, at most that)
``count within budget``    adaptive counts (:func:`adaptive_counts`: a diversity stage with ``exact_counts = False``)
                           ``counts[b] <=`` the resolved (or adaptive) total; called directly, the stage returns
                           at most what it is asked for
``keep-all``               a row the budget covers (``pipeline.budget.covers``: by default a budget at or above
                           its real tokens, 1.0) keeps every real token, its own value, nothing merged
``ascending unique``       a row's kept indices are strictly increasing
``padding never chosen``   every kept index is a real token (``visual_mask`` True)
``critical on kept only``  ``critical`` is never set on a padding slot
``critical count``         critical tokens per row: 0 without scores; the whole budget when the diversity stage
                           adds nothing; else ``min(allocation.critical, total)`` (``adapt`` for an adaptive
                           allocator)
``* stage output``         the critical / diversity stage called directly (``Pipeline.select`` masks their output,
                           which would hide a stage picking padding): (B, N) bool, exactly the asked count, real
                           tokens only, diversity picks disjoint from the critical ones
``critical top scores``    (``top_scores=True``) no unchosen real token scores above a critical one
``values shape``           merge stages: ``values`` is (B, K, D) floating point, finite at kept slots
``merge output``           merging stages (``sizes`` / ``assignment`` set, both or neither): ``sizes`` (B, K) long,
                           0 at padding slots and >= 1 at kept ones; ``assignment`` (B, N) long in -1..K-1, -1 at
                           padding tokens, each kept token assigned its own slot; ``sizes[b, k]`` is the number of
                           tokens assigned to slot k, so a row's sizes sum to the real tokens it covers
``batch == per-sample``    each row alone (``Signals.row``) keeps the same indices, critical flags and values
``padding invariance``     a row cut to its real tokens (no mask, its own grid) keeps the same tokens; the batch
                           with extra padding of huge values appended keeps the same tokens (a row with exact
                           duplicate tokens: the same count; their ties may fall differently with the padded width)
``determinism``            a second call gives the same indices, critical flags and values
``requires declared``      (``check_pipeline``) signals holding only the declared ``requires`` give the same
                           selection
=========================  =====================================================================================

A failure raises :class:`ContractError` (an ``AssertionError``) whose message names the pipeline or recipe,
the property, the row, the budget and the batch (row lengths, seed, factory), e.g.::

    ContractError: [critical.my_topk: prompt_cosine+critical.my_topk+diversity.none] property 'padding never
    chosen' fails at budget=3, row 1 (lengths [9, 6], seed 0, ragged_signals): critical stage 'my_topk' picked
    padding [6, 7, 8]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from vtprune.framework import Selection, Signals, resolve_budget
from vtprune.framework.stages import BudgetAllocator

from .signals import pad_signals, trim_row

__all__ = ["ContractError", "EXTRA_PADDING", "adaptive_counts", "check_selection"]

#: Extra padding tokens appended for the padding-invariance property.
EXTRA_PADDING = 3


class ContractError(AssertionError):
    """A stage or pipeline broke the selection contract; the message says which property, where and how."""


@dataclasses.dataclass(frozen=True)
class _Where:
    """What a failure message names besides the property."""

    label: str
    budget: Any
    context: str

    def fail(self, prop: str, detail: str, row: Optional[int] = None) -> ContractError:
        at_row = f", row {row}" if row is not None else ""
        return ContractError(
            f"[{self.label}] property {prop!r} fails at budget={self.budget!r}{at_row} ({self.context}): {detail}"
        )


def _describe(signals: Signals) -> str:
    return f"lengths {signals.valid().sum(1).tolist()}"


# ---------------------------------------------------------------------------------------------------------------
# One batch, one budget
# ---------------------------------------------------------------------------------------------------------------


def _expected_counts(pipeline: Any, budget: Any, valid_counts: Tensor) -> Tensor:
    allocator = getattr(pipeline, "budget", None)
    resolve = allocator.resolve if isinstance(allocator, BudgetAllocator) else resolve_budget
    if isinstance(budget, Sequence) and not isinstance(budget, str):
        return torch.cat([resolve(b, valid_counts[i : i + 1]) for i, b in enumerate(budget)])
    return resolve(budget, valid_counts)


@dataclasses.dataclass(frozen=True)
class _CountRule:
    """What a pipeline must keep per row for one batch and budget (the rules of ``Pipeline.select``)."""

    counts: Tensor  # (B,) long: tokens each row keeps, or (``at_most``) the most it may keep
    at_most: bool  # True for an adaptive pipeline whose diversity stage keeps its own count (<= ``counts``)
    whole: Tensor  # (B,) bool: rows the budget covers (`BudgetAllocator.covers`): every real token, untouched
    scores: Optional[Tensor]  # (B, N) masked float32 relevance scores, None without scores or stages
    critical: Optional[Tensor]  # (B,) long: critical tokens per row; None for a duck-typed pipeline


def adaptive_counts(pipeline: Any) -> bool:
    """True when ``pipeline``'s kept count comes from the data: an allocator with ``adaptive_counts``, or a diversity
    stage with ``exact_counts`` False (class attribute or property). Such pipelines get the relaxed contract: the
    count is at most the resolved budget instead of equal to it; every other property still holds."""
    allocator, diversity = getattr(pipeline, "budget", None), getattr(pipeline, "diversity", None)
    return bool(getattr(allocator, "adaptive_counts", False)) or getattr(diversity, "exact_counts", True) is False


def _count_rule(pipeline: Any, signals: Signals, budget: Any) -> _CountRule:
    """The counts, keep-all rows and critical counts ``Pipeline.select`` promises (docs/architecture.md)."""
    valid = signals.valid()  # (B, N)
    valid_counts = valid.sum(1)  # (B,)
    resolved = _expected_counts(pipeline, budget, valid_counts)  # (B,)
    allocator = getattr(pipeline, "budget", None)
    if isinstance(allocator, BudgetAllocator):
        covered = allocator.covers(budget, resolved, valid_counts)
    else:
        covered = resolved >= valid_counts
    whole = torch.zeros_like(valid_counts, dtype=torch.bool) if covered is None else covered.bool()  # (B,)
    if not all(hasattr(pipeline, name) for name in ("relevance", "critical", "diversity", "budget")):
        return _CountRule(resolved, adaptive_counts(pipeline), whole, None, None)  # a duck-typed pipeline: no stages to read the rule from
    scores = pipeline.relevance.score(signals)
    if scores is not None:
        scores = scores.float().masked_fill(~valid, float("-inf"))  # (B, N)
    totals = resolved
    if getattr(allocator, "adaptive_counts", False):
        allocation = allocator.adapt(signals, budget, resolved, valid, scores)
        adapted = torch.minimum(allocation.total.clamp(min=0), resolved)  # (B,)
        critical = torch.minimum(allocation.critical.clamp(min=0), adapted)  # (B,)
        totals = torch.where(whole, resolved, adapted)  # (B,)
    elif scores is not None and pipeline.diversity.adds_tokens:
        allocation = allocator.allocate(resolved, valid, scores)
        critical = torch.minimum(allocation.critical.clamp(min=0), resolved)  # (B,)
    if scores is None:
        critical = torch.zeros_like(totals)
    elif not pipeline.diversity.adds_tokens:
        critical = totals
    inexact = getattr(pipeline.diversity, "exact_counts", True) is False  # an adaptive allocator's count is exact
    return _CountRule(totals, inexact, whole, scores, critical)


def _same(
    a: Selection,
    b: Selection,
    row_a: int,
    row_b: int,
    visual_a: Tensor,
    visual_b: Tensor,
    valid_a: Optional[Tensor] = None,
) -> Optional[str]:
    """None when row ``row_a`` of ``a`` and row ``row_b`` of ``b`` keep the same tokens, flags and token values
    (``Selection.gather``: merged values where a stage set them, else the tokens themselves; ``visual_*`` are the
    (B, N, D) tokens each selection was made from). With ``valid_a`` (the (N,) real tokens of row ``row_a``), a row
    with exact duplicate tokens only needs the same count (see :func:`_duplicates`)."""
    kept_a, kept_b = a.row_indices(row_a), b.row_indices(row_b)
    values_a = a.gather(visual_a)[row_a][a.mask[row_a]]  # (K_b, D)
    values_b = b.gather(visual_b)[row_b][b.mask[row_b]]  # (K_b, D)
    if not torch.equal(kept_a, kept_b):
        if not (valid_a is not None and _duplicates(kept_a, kept_b, visual_a[row_a], valid_a)):
            return f"kept {kept_b.tolist()} instead of {kept_a.tolist()}"
        return None
    crit_a, crit_b = a.critical[row_a][a.mask[row_a]], b.critical[row_b][b.mask[row_b]]
    if not torch.equal(crit_a, crit_b):
        return f"critical flags {crit_b.int().tolist()} instead of {crit_a.int().tolist()}"
    if not torch.equal(values_a, values_b):
        return "has different kept (merged) token values"
    if a.sizes is not None or b.sizes is not None:
        sizes_a, slots_a = _merge_view(a, row_a, visual_a.shape[1])
        sizes_b, slots_b = _merge_view(b, row_b, visual_b.shape[1])
        if not torch.equal(sizes_a, sizes_b):
            return f"merged sizes {sizes_b.tolist()} instead of {sizes_a.tolist()}"
        common = min(slots_a.numel(), slots_b.numel())  # the longer one only adds padding (-1)
        if not torch.equal(slots_a[:common], slots_b[:common]) or bool((slots_a[common:] >= 0).any()) or bool(
            (slots_b[common:] >= 0).any()
        ):
            return "has a different merge assignment"
    return None


def _merge_view(selection: Selection, row: int, tokens: int) -> tuple[Tensor, Tensor]:
    """A row's (K_b,) sizes and (N,) slot assignment; a selection without merging output is the identity merge
    (size 1, each kept token its own slot, every other token -1)."""
    mask = selection.mask[row]
    if selection.sizes is not None:
        return selection.sizes[row][mask], selection.assignment[row]
    kept = selection.row_indices(row)
    slots = torch.full((tokens,), -1, dtype=torch.long, device=kept.device)
    slots[kept] = torch.arange(kept.numel(), device=kept.device)
    return torch.ones(kept.numel(), dtype=torch.long, device=kept.device), slots


def _duplicates(kept_a: Tensor, kept_b: Tensor, visual: Tensor, valid: Tensor) -> bool:
    """True when two selections of one row may legitimately differ: the same number of tokens from a row whose real
    tokens include exact duplicates. Distances between duplicates are ties that floating-point noise breaks, and
    that noise may depend on the padded width (a matmul's summation order), so only counts are comparable."""
    if kept_a.numel() != kept_b.numel():
        return False
    real = visual[valid]  # (n, D)
    return torch.unique(real, dim=0).shape[0] < real.shape[0]


def _check_structure(selection: Selection, signals: Signals, where: _Where) -> None:
    batch = signals.batch_size
    if not isinstance(selection, Selection):
        raise where.fail("selection shapes", f"select returned {type(selection).__name__}, not a Selection")
    indices, mask, critical = selection.indices, selection.mask, selection.critical
    if indices.dim() != 2 or indices.shape[0] != batch or indices.dtype != torch.long:
        raise where.fail("selection shapes", f"indices must be (B={batch}, K) long, got {tuple(indices.shape)} {indices.dtype}")
    for name, value in (("mask", mask), ("critical", critical)):
        if value.shape != indices.shape or value.dtype != torch.bool:
            raise where.fail("selection shapes", f"{name} must be {tuple(indices.shape)} bool, got {tuple(value.shape)} {value.dtype}")
    for row in range(batch):
        count = int(mask[row].sum())
        if bool(mask[row, count:].any()):
            raise where.fail("selection shapes", f"mask {mask[row].int().tolist()} is not a prefix of real slots", row)
    if selection.values is not None:
        values = selection.values
        wanted = (*indices.shape, signals.visual.shape[-1])
        if tuple(values.shape) != wanted or not values.is_floating_point():
            raise where.fail("values shape", f"values must be {wanted} floating point, got {tuple(values.shape)} {values.dtype}")
        if not bool(torch.isfinite(values[mask]).all()):
            raise where.fail("values shape", "values at kept slots are not finite")


def _check_merge(selection: Selection, signals: Signals, where: _Where) -> None:
    """The merging output (``sizes``, ``assignment``) of `Selection`, when set."""
    sizes, assignment = selection.sizes, selection.assignment
    if sizes is None and assignment is None:
        return
    if sizes is None or assignment is None:
        raise where.fail("merge output", "sizes and assignment must be set together")
    batch, width = selection.indices.shape
    if tuple(sizes.shape) != (batch, width) or sizes.dtype != torch.long:
        raise where.fail("merge output", f"sizes must be ({batch}, {width}) long, got {tuple(sizes.shape)} {sizes.dtype}")
    wanted = (batch, signals.num_tokens)
    if tuple(assignment.shape) != wanted or assignment.dtype != torch.long:
        raise where.fail("merge output", f"assignment must be {wanted} long, got {tuple(assignment.shape)} {assignment.dtype}")
    valid = signals.valid()
    for row in range(batch):
        mask = selection.mask[row]
        if bool((sizes[row][~mask] != 0).any()) or bool((sizes[row][mask] < 1).any()):
            raise where.fail("merge output", f"sizes {sizes[row].tolist()} are not >= 1 at kept slots and 0 at padding", row)
        slots = assignment[row]
        if bool((slots < -1).any()) or bool((slots >= int(mask.sum())).any()):
            raise where.fail("merge output", f"assignment {slots.tolist()} is outside -1..{int(mask.sum()) - 1}", row)
        if bool((slots[~valid[row]] != -1).any()):
            raise where.fail("merge output", "a padding token is assigned to a kept slot", row)
        kept = selection.row_indices(row)
        own = slots[kept]
        if not torch.equal(own, torch.arange(kept.numel(), device=own.device)):
            raise where.fail("merge output", f"kept tokens are assigned slots {own.tolist()}, not their own", row)
        counts = torch.bincount(slots[slots >= 0], minlength=width)[:width]
        if not torch.equal(counts, sizes[row]):
            raise where.fail(
                "merge output", f"sizes {sizes[row].tolist()} do not count the assignment ({counts.tolist()})", row
            )


def _check_whole(selection: Selection, signals: Signals, whole: Tensor, where: _Where) -> None:
    """Rows the budget covers keep every real token, with its own value, nothing merged into it."""
    valid = signals.valid()  # (B, N)
    gathered = selection.gather(signals.visual)  # (B, K, D)
    for row in whole.nonzero().flatten().tolist():
        kept, real = selection.row_indices(row), valid[row].nonzero().flatten()
        if not torch.equal(kept, real):
            missing = sorted(set(real.tolist()) - set(kept.tolist()))
            raise where.fail("keep-all", f"the budget covers the row's {real.numel()} real tokens, but {missing} are dropped", row)
        if not torch.equal(gathered[row][selection.mask[row]], signals.visual[row, real]):
            raise where.fail("keep-all", "the budget covers the row, but kept token values were changed (merged)", row)
        if selection.sizes is not None:
            sizes, slots = _merge_view(selection, row, signals.num_tokens)
            if bool((sizes != 1).any()) or not torch.equal(slots[real], torch.arange(real.numel(), device=slots.device)):
                raise where.fail("keep-all", f"the budget covers the row, but tokens were merged (sizes {sizes.tolist()})", row)


def _check_rows(selection: Selection, signals: Signals, rule: _CountRule, where: _Where) -> None:
    valid = signals.valid()  # (B, N)
    counts, expected = selection.counts, rule.counts
    for row in range(signals.batch_size):
        if rule.at_most and int(counts[row]) > int(expected[row]):
            raise where.fail(
                "count within budget",
                f"kept {int(counts[row])} tokens, more than the {int(expected[row])} the budget allows "
                f"(row has {int(valid[row].sum())} real tokens)",
                row,
            )
        if not rule.at_most and int(counts[row]) != int(expected[row]):
            raise where.fail(
                "exact count",
                f"kept {int(counts[row])} tokens, the budget resolves to {int(expected[row])} "
                f"(row has {int(valid[row].sum())} real tokens)",
                row,
            )
        kept = selection.row_indices(row)
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= signals.num_tokens):
            raise where.fail("padding never chosen", f"kept index out of range 0..{signals.num_tokens - 1}: {kept.tolist()}", row)
        if not bool(torch.all(kept[1:] > kept[:-1])):
            raise where.fail("ascending unique", f"kept indices {kept.tolist()} are not strictly increasing", row)
        padding = kept[~valid[row, kept]]
        if padding.numel():
            raise where.fail("padding never chosen", f"kept index {padding.tolist()} is padding", row)
    stray = selection.critical & ~selection.mask
    if bool(stray.any()):
        row = int(stray.any(1).nonzero()[0])
        raise where.fail("critical on kept only", "critical is set on a padding slot of the selection", row)


def _check_critical(selection: Selection, signals: Signals, scores: Optional[Tensor], wanted: Tensor, where: _Where, top_scores: bool) -> None:
    """Critical count (the pipeline's rule) and, with ``top_scores``, that the critical tokens are the top-scoring."""
    valid = signals.valid()
    critical = selection.critical.sum(1)  # (B,)
    for row in range(signals.batch_size):
        if int(critical[row]) != int(wanted[row]):
            raise where.fail("critical count", f"{int(critical[row])} critical tokens, the allocation asks for {int(wanted[row])}", row)
        if scores is None or not top_scores:
            continue
        chosen = selection.indices[row][selection.critical[row] & selection.mask[row]]
        if chosen.numel():
            others = valid[row].clone()
            others[chosen] = False
            threshold = scores[row, chosen].min()
            above = others.nonzero().flatten()[scores[row][others] > threshold]
            if above.numel():
                raise where.fail(
                    "critical top scores",
                    f"unchosen token(s) {above.tolist()} score above critical token(s) scoring {float(threshold):.6g} "
                    "(pass top_scores=False for a critical selector that is deliberately not top-k)",
                    row,
                )


def _check_stage_outputs(pipeline: Any, signals: Signals, scores: Optional[Tensor], wanted: Tensor, totals: Tensor, where: _Where) -> None:
    """The critical and diversity stages called directly, as the pipeline calls them: ``Pipeline.select`` masks
    their outputs with ``valid``, which would hide a stage that picks padding or the wrong number of tokens."""
    valid = signals.valid()  # (B, N)
    chosen = torch.zeros_like(valid)
    if scores is not None and bool((wanted > 0).any()):
        chosen = pipeline.critical.select(scores, wanted, valid)  # (B, N)
        stage = f"critical stage {pipeline.critical.name!r}"
        if tuple(chosen.shape) != tuple(valid.shape) or chosen.dtype != torch.bool:
            raise where.fail("critical stage output", f"{stage} returned {tuple(chosen.shape)} {chosen.dtype}, not (B, N) bool")
        for row in range(signals.batch_size):
            padding = (chosen[row] & ~valid[row]).nonzero().flatten()
            if padding.numel():
                raise where.fail("padding never chosen", f"{stage} picked padding {padding.tolist()}", row)
            if int(chosen[row].sum()) != int(wanted[row]):
                raise where.fail("exact count", f"{stage} picked {int(chosen[row].sum())} tokens, asked for {int(wanted[row])}", row)
    remaining = totals - chosen.sum(1)  # (B,)
    unselected = (valid & ~chosen).sum(1)  # (B,)
    if bool((remaining == unselected).all()) or not bool((remaining > 0).any()):
        return  # the pipeline keeps every remaining token itself, or needs nothing more
    stage = f"diversity stage {pipeline.diversity.name!r}"
    inexact = getattr(pipeline.diversity, "exact_counts", True) is False  # the stage keeps its own count, at most asked
    supplement = pipeline.diversity.supplement(signals, chosen, remaining, valid, scores)
    mask = supplement.mask
    if tuple(mask.shape) != tuple(valid.shape) or mask.dtype != torch.bool:
        raise where.fail("diversity stage output", f"{stage} returned a mask {tuple(mask.shape)} {mask.dtype}, not (B, N) bool")
    for row in range(signals.batch_size):
        padding = (mask[row] & ~valid[row]).nonzero().flatten()
        if padding.numel():
            raise where.fail("padding never chosen", f"{stage} picked padding {padding.tolist()}", row)
        again = (mask[row] & chosen[row]).nonzero().flatten()
        if again.numel():
            raise where.fail("diversity stage output", f"{stage} picked already selected tokens {again.tolist()}", row)
        picked = int(mask[row].sum())
        if picked > int(remaining[row]) if inexact else picked != int(remaining[row]):
            relation = "at most" if inexact else "exactly"
            raise where.fail("exact count", f"{stage} picked {picked} tokens, asked for {relation} {int(remaining[row])}", row)
    if supplement.values is not None and tuple(supplement.values.shape[:2]) != tuple(valid.shape):
        raise where.fail("values shape", f"{stage} returned values {tuple(supplement.values.shape)}, not (B, N, D)")


def _select(pipeline: Any, signals: Signals, budget: Any, where: _Where, what: str) -> Selection:
    """``pipeline.select``; any exception becomes a `ContractError` naming the call."""
    try:
        return pipeline.select(signals, budget)
    except ContractError:
        raise
    except Exception as error:
        raise where.fail("select runs", f"select on {what} raised {type(error).__name__}: {error}") from error


def check_selection(
    pipeline: Any,
    signals: Signals,
    budget: Any,
    *,
    label: Optional[str] = None,
    context: str = "",
    top_scores: bool = True,
    padding: bool = True,
) -> Selection:
    """Check the selection contract of ``pipeline`` on one batch and one budget; return the selection.

    Args:
        pipeline: a composed `Pipeline`, or any object with ``select(signals, budget)`` (then the critical checks,
            which read the stages, are skipped, and the count rule is the default one unless it has a ``budget``
            allocator).
        signals: the batch (e.g. from :func:`vtprune.testing.make_signals`).
        budget: an int, a float in (0, 1], or one of those per row.
        label: what failure messages call the pipeline (default: ``str(pipeline)``).
        context: extra words for failure messages (how the batch was made).
        top_scores: check that critical tokens are the top-scoring ones (true of top-k critical selectors).
        padding: also run the padding-invariance properties (trimmed rows, extra padding).
    Raises: `ContractError` naming the property, row and budget.
    """
    where = _Where(label or str(pipeline), budget, context or _describe(signals))
    rule = _count_rule(pipeline, signals, budget)
    if rule.critical is not None:
        _check_stage_outputs(pipeline, signals, rule.scores, rule.critical, rule.counts, where)
    selection = _select(pipeline, signals, budget, where, "the batch")
    _check_structure(selection, signals, where)
    _check_rows(selection, signals, rule, where)
    _check_merge(selection, signals, where)
    _check_whole(selection, signals, rule.whole, where)
    if rule.critical is not None:
        _check_critical(selection, signals, rule.scores, rule.critical, where, top_scores)
    per_row = isinstance(budget, Sequence) and not isinstance(budget, str)
    for row in range(signals.batch_size):
        single = signals.row(row)
        alone = _select(pipeline, single, [budget[row]] if per_row else budget, where, f"row {row} alone")
        problem = _same(selection, alone, row, 0, signals.visual, single.visual)
        if problem:
            raise where.fail("batch == per-sample", f"alone the row {problem}", row)
    if padding:
        lengths = signals.valid().sum(1).tolist()
        for row, length in enumerate(lengths):
            own = signals.row_grids()[row]
            if length == 0 or (own is not None and own[0] * own[1] != length):
                continue  # a grid over padding cannot be trimmed
            cut = trim_row(signals, row, length)
            trimmed = _select(pipeline, cut, [budget[row]] if per_row else budget, where, f"row {row} cut to its real tokens")
            problem = _same(selection, trimmed, row, 0, signals.visual, cut.visual)
            if problem:
                raise where.fail("padding invariance", f"cut to its {length} real tokens the row {problem}", row)
        extended = pad_signals(signals, EXTRA_PADDING)
        padded = _select(pipeline, extended, budget, where, "the batch with extra padding")
        for row in range(signals.batch_size):
            problem = _same(selection, padded, row, row, signals.visual, extended.visual, signals.valid()[row])
            if problem:
                raise where.fail("padding invariance", f"with {EXTRA_PADDING} extra padding tokens of huge values the row {problem}", row)
    again = _select(pipeline, signals, budget, where, "the batch, a second time")
    for row in range(signals.batch_size):
        problem = _same(selection, again, row, row, signals.visual, signals.visual)
        if problem:
            raise where.fail("determinism", f"a second call {problem}", row)
    return selection
