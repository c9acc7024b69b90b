"""Budget validation and the default rule that turns a budget into per-row counts."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .errors import BudgetError

__all__ = ["Budget", "validate_budget", "resolve_budget"]

Budget = int | float


def validate_budget(budget: object) -> Budget:
    """Return ``budget`` if it is a positive int or a float in (0, 1]; raise `BudgetError` otherwise.

    >>> validate_budget(64), validate_budget(0.25)
    (64, 0.25)
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise BudgetError(
            f"budget must be an int (visual tokens kept per image) or a float in (0, 1] (fraction "
            f"kept), got {budget!r} of type {type(budget).__name__}"
        )
    if isinstance(budget, numbers.Integral):
        if budget <= 0:
            raise BudgetError(f"budget must be a positive token count, got {budget}")
        return int(budget)
    value = float(budget)
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise BudgetError(
            f"a float budget is the fraction of tokens kept and must be in (0, 1], got {value}; "
            "pass an int to keep a number of tokens"
        )
    return value


def resolve_budget(budget: Budget, valid_counts: Tensor) -> Tensor:
    """(B,) long: tokens kept per row.

    An int keeps ``min(budget, valid)``; a float f keeps ``floor(f * valid + 0.5)`` (round half up),
    at least one token, at most ``valid``. A row with no real token keeps none.

    >>> resolve_budget(0.5, torch.tensor([5, 4, 0])).tolist()
    [3, 2, 0]
    """
    budget = validate_budget(budget)
    valid_counts = valid_counts.long()
    if isinstance(budget, int):
        return valid_counts.clamp(max=budget)
    wanted = torch.floor(valid_counts.double() * budget + 0.5).long()  # (B,)
    return torch.minimum(wanted.clamp(min=1), valid_counts)
