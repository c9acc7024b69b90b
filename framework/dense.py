"""The index path of `Pipeline.select` for pipelines whose critical selector fills the whole budget.

FastV and PyramidDrop (``relevance+topk_official+diversity.none``) choose each row's tokens with one top-k.
On unpadded rows (``visual_mask`` None or True everywhere, as adapters pass it) with one int budget every row keeps the same count, so the
critical selector's index form (`CriticalSelector.select_indices`) gives the `Selection` directly: no
(B, N) keep mask, no stable sort of it, no mask bookkeeping (issue 19: the framework's fixed cost around
FastV's top-k). The result is the one the mask path gives (tested in tests/framework/test_dense_select.py).
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence

import torch

from .budget import Budget, validate_budget
from .selection import Selection
from .signals import Signals
from .stages import CriticalSelector, zero_budget_allowed

#: A `framework.Pipeline` (not imported: pipeline.py imports this module).
Pipeline = Any

__all__ = ["index_path_applies", "index_path_select"]


def index_path_applies(pipeline: Pipeline) -> bool:
    """Whether ``pipeline`` can take the index path at all (a fact of its stages, known at compose time):
    its scorer gives scores, its critical selector has an index form and fills the budget alone (the
    diversity stage adds nothing, the allocator's counts do not come from the data)."""
    return (
        pipeline.relevance.gives_scores
        and not pipeline.diversity.adds_tokens
        and not pipeline.budget.adaptive_counts
        and type(pipeline.critical).select_indices is not CriticalSelector.select_indices
    )


def index_path_select(pipeline: Pipeline, signals: Signals, budget: Budget | Sequence[Budget]) -> Optional[Selection]:
    """``pipeline.select(signals, budget)`` by the index path, or None when this call needs the mask path:
    padded rows (a ``visual_mask`` with a False entry), a per-row budget, a count that keeps every token or none, or a stage that gives no scores
    or no index form on this input. Only for pipelines where :func:`index_path_applies`."""
    if not (type(budget) is int or _is_int_budget(budget)):
        return None
    if signals.visual_mask is not None and not bool(signals.visual_mask.all()):  # adapters pass an all-True mask
        return None
    tokens = signals.visual.shape[1]
    # every row has N real tokens and allocators resolve rows independently: one row's count is every row's
    count = pipeline.budget.resolve_count(validate_budget(budget, allow_zero=zero_budget_allowed(pipeline)), tokens)
    if not 0 < count < tokens:
        return None  # keep-all and keep-none rules live in the mask path
    scores = pipeline.relevance.score(signals)
    if scores is None:
        return None
    indices = pipeline.critical.select_indices(scores.float(), count)  # (B, k)
    if indices is None:
        return None
    mask = torch.ones(indices.shape, dtype=torch.bool, device=indices.device)  # (B, k)
    return Selection(indices=indices, mask=mask, critical=mask)  # every kept token is critical: one read-only tensor


def _is_int_budget(budget: object) -> bool:
    """An integral budget other than a Python int (numpy integers, ...); bools are not budgets."""
    return isinstance(budget, numbers.Integral) and not isinstance(budget, bool)
