"""Count the torch operators a call dispatches (a proxy for GPU kernel launches).

Not part of the package: imported by ``benchmarks/selection.py --count-ops`` and by
``tests/test_op_counts.py``. Every ATen operator that reaches the dispatcher below autograd is
counted once, views and scalar reads (``.item()``, a device sync on a GPU) included, so the count is
an upper bound on the kernels a GPU would launch for the same Python code.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounter", "count_ops"]

T = TypeVar("T")


class OpCounter(TorchDispatchMode):
    """A dispatch mode that records each dispatched operator by name (``aten.mm.default`` ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        """Number of operators dispatched so far."""
        return sum(self.ops.values())


def count_ops(function: Callable[[], T]) -> tuple[T, OpCounter]:
    """Run ``function`` once under an `OpCounter`; returns its result and the counter."""
    with torch.no_grad(), OpCounter() as counter:
        result = function()
    return result, counter
