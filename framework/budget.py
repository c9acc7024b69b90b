"""Budgets: validation and normalisation at the boundary, and the one rule that turns a budget into counts.

A budget is an int (visual tokens kept per image), a float in (0, 1] (fraction of each image's
tokens kept), or a sequence / 1-D tensor of those with one entry per image. The count 0 (no visual token
kept) is a budget only where the caller allows it (``allow_zero``: a placement that withdraws the visual
tokens inside the LLM while the text goes on, `LayerPlacement.accepts_zero_budget`, VTW); elsewhere it is a
`BudgetError` naming the placements that take it. `validate_budget`
checks one value; `normalize_budget` checks and normalises whatever a user passes (scalar or
per-image) once, where it enters the library (``framework.prune``, ``PruneHandle.budget``, the YAML
configs); everything downstream reads the normalised value.

`resolve_budget` turns a (validated) budget into per-row counts with a named rounding rule and
`scaled_counts` splits a count by a fraction with one: every built-in allocator calls these two,
so the methods differ only in the rounding they name (``ROUNDINGS``).
"""

from __future__ import annotations

import math
import numbers
from typing import Literal, Union

import torch
from torch import Tensor

from .errors import BudgetError

__all__ = [
    "ZERO_BUDGET_HINT",
    "Budget",
    "BudgetLike",
    "ROUNDINGS",
    "Rounding",
    "normalize_budget",
    "resolve_budget",
    "resolve_count",
    "round_counts",
    "scaled_counts",
    "validate_budget",
]

Budget = Union[int, float]
#: What a caller may pass: one budget for every image, or one per image.
BudgetLike = Union[Budget, tuple[Budget, ...]]
Rounding = Literal["half_up", "half_even", "floor", "ceil"]
#: Rounding rules of `round_counts`: half_up = floor(x + 0.5) (the framework default), half_even =
#: Python's / torch's round (FastV, DivPrune), floor = int() truncation of a non-negative value
#: (PyramidDrop, VisPruner), ceil.
ROUNDINGS: tuple[str, ...] = ("half_up", "half_even", "floor", "ceil")


#: Why a zero budget was refused: where it is meaningful (named in the error).
ZERO_BUDGET_HINT = (
    "budget 0 keeps no visual token; only a placement that withdraws the visual tokens inside the language model "
    "accepts it (placement.withdraw, the `vtw` preset); pass a positive count or a fraction in (0, 1]"
)


def validate_budget(budget: object, *, allow_zero: bool = False) -> Budget:
    """Return ``budget`` if it is a positive int or a float in (0, 1] (or the int 0 with ``allow_zero``); raise
    `BudgetError` otherwise.

    >>> validate_budget(64), validate_budget(0.25), validate_budget(0, allow_zero=True)
    (64, 0.25, 0)
    """
    if type(budget) is int and (budget > 0 or (allow_zero and budget == 0)):
        return budget  # the common case, without the abstract-base-class checks below
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise BudgetError(
            f"budget must be an int (visual tokens kept per image) or a float in (0, 1] (fraction "
            f"kept), got {budget!r} of type {type(budget).__name__}"
        )
    if isinstance(budget, numbers.Integral):
        if budget == 0 and allow_zero:
            return 0
        if budget == 0:
            raise BudgetError(f"budget must be a positive token count, got 0 ({ZERO_BUDGET_HINT})")
        if budget < 0:
            raise BudgetError(f"budget must be a positive token count, got {budget}")
        return int(budget)
    value = float(budget)
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise BudgetError(
            f"a float budget is the fraction of tokens kept and must be in (0, 1], got {value}; "
            "pass an int to keep a number of tokens"
        )
    return value


def normalize_budget(budget: object, *, allow_zero: bool = False) -> BudgetLike:
    """Validate a user's budget once and return it normalised (``allow_zero``: the count 0 is a budget, see
    `validate_budget`).

    An int / float (or a 0-d tensor) -> the validated int or float; a list, tuple or 1-D tensor
    with one budget per image -> a non-empty tuple of validated ints / floats. Anything else, and
    any bad entry, raises `BudgetError` naming the problem (``budget[2]: ...`` for an entry).

    >>> normalize_budget(64), normalize_budget([16, 0.5]), normalize_budget(torch.tensor([8, 4]))
    (64, (16, 0.5), (8, 4))
    """
    if isinstance(budget, Tensor):
        if budget.dim() == 0:
            return validate_budget(budget.item(), allow_zero=allow_zero)
        if budget.dim() != 1:
            raise BudgetError(f"a per-image budget tensor must be 1-D (one entry per image), got shape {tuple(budget.shape)}")
        budget = budget.tolist()
    if isinstance(budget, (list, tuple)):
        if not budget:
            raise BudgetError("a per-image budget needs at least one entry (one budget per image), got an empty sequence")
        entries = []
        for index, entry in enumerate(budget):
            try:
                entries.append(validate_budget(entry, allow_zero=allow_zero))
            except BudgetError as error:
                raise BudgetError(f"budget[{index}]: {error}") from None
        return tuple(entries)
    return validate_budget(budget, allow_zero=allow_zero)


def round_counts(values: Tensor, rounding: str) -> Tensor:
    """(B,) long: non-negative real ``values`` rounded to counts with the named rule (`ROUNDINGS`)."""
    values = values.double()  # (B,)
    if rounding == "half_up":
        rounded = torch.floor(values + 0.5)
    elif rounding == "half_even":
        rounded = torch.round(values)
    elif rounding == "floor":
        rounded = torch.floor(values)
    elif rounding == "ceil":
        rounded = torch.ceil(values)
    else:
        raise ValueError(f"unknown rounding {rounding!r}; valid: {', '.join(ROUNDINGS)}")
    return rounded.long()  # (B,)


def resolve_budget(budget: Budget, valid_counts: Tensor, *, rounding: str = "half_up") -> Tensor:
    """(B,) long: tokens kept per row.

    An int keeps ``min(budget, valid)``; a float f keeps ``rounding(f * valid)`` (default: round
    half up, ``floor(f * valid + 0.5)``), at least one token, at most ``valid``. A row with no real
    token keeps none.

    >>> resolve_budget(0.5, torch.tensor([5, 4, 0])).tolist()
    [3, 2, 0]
    >>> resolve_budget(0.5, torch.tensor([5, 4, 0]), rounding="half_even").tolist()
    [2, 2, 0]
    """
    budget = validate_budget(budget, allow_zero=True)  # a zero budget was refused at the boundary where it is not one
    valid_counts = valid_counts.long()  # (B,)
    if isinstance(budget, int):
        return valid_counts.clamp(max=budget)
    wanted = round_counts(valid_counts.double() * budget, rounding)  # (B,)
    return torch.minimum(wanted.clamp(min=1), valid_counts)


def resolve_count(budget: Budget, tokens: int, *, rounding: str = "half_up") -> int:
    """`resolve_budget` for one row of ``tokens`` real tokens, on the host (no tensor): the same rule.

    >>> resolve_count(64, 576), resolve_count(0.5, 5), resolve_count(0.5, 5, rounding="half_even"), resolve_count(0.5, 0)
    (64, 3, 2, 0)
    """
    budget = validate_budget(budget, allow_zero=True)
    if isinstance(budget, int):
        return min(budget, tokens)
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; valid: {', '.join(ROUNDINGS)}")
    value = float(tokens) * budget  # the product in double, as resolve_budget's
    rounded = {"half_up": math.floor(value + 0.5), "half_even": round(value), "floor": math.floor(value), "ceil": math.ceil(value)}[rounding]
    return min(max(int(rounded), 1), tokens)


def scaled_counts(totals: Tensor, numerator: float, denominator: float = 1, *, rounding: str = "half_up") -> Tensor:
    """(B,) long: ``rounding(totals * numerator / denominator)``, at most ``totals`` (a split's share).

    Computed in that order (product first) so that a ratio of two integers rounds exactly.

    >>> scaled_counts(torch.tensor([10, 5]), 0.5).tolist(), scaled_counts(torch.tensor([10, 5]), 0.5, rounding="floor").tolist()
    ([5, 3], [5, 2])
    """
    totals = totals.long()  # (B,)
    share = round_counts(totals.double() * numerator / denominator, rounding)  # (B,)
    return torch.minimum(share, totals)

