"""Count the torch operators a call dispatches (a proxy for GPU kernel launches).

Not part of the package: imported by ``benchmarks/selection.py --count-ops`` and by
``tests/test_op_counts.py``. Every ATen operator that reaches the dispatcher below autograd is
counted once, views and scalar reads (``.item()``, a device sync on a GPU) included, so the count is
an upper bound on the kernels a GPU would launch for the same Python code.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vtprune.framework import Signals

__all__ = ["GATHER_OPS", "NO_KERNEL_OPS", "SCATTER_OPS", "OpCounter", "count_ops", "selection_signals"]

T = TypeVar("T")


#: Operators that never launch a device kernel besides views: wrapping a Python constant.
NO_KERNEL_OPS = frozenset({"aten.lift_fresh.default"})
#: Indexing reads: they read what they return (and the index), not their whole source.
GATHER_OPS = frozenset({"aten.gather.default", "aten.index.Tensor", "aten.index_select.default"})
#: In-place indexed writes: they touch the indexed entries only.
SCATTER_OPS = frozenset({
    "aten.scatter_.value", "aten.scatter_.src", "aten.index_fill_.int_Scalar", "aten.index_fill_.int_Tensor",
    "aten.index_put_.default",
})


class OpCounter(TorchDispatchMode):
    """A dispatch mode that records each dispatched operator by name (``aten.mm.default`` ...).

    Besides the count it keeps ``launches`` (operators other than views and `NO_KERNEL_OPS`, i.e.
    the ones that run a kernel or a copy on a GPU) and ``bytes`` (for those, the bytes of every
    tensor argument and result, except that an indexing read counts its result twice plus the index
    (`GATHER_OPS`) and an in-place indexed write its index and values twice (`SCATTER_OPS`): what a
    kernel reads and writes, caches ignored).
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.launches = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = str(func)
        self.ops[name] += 1
        result = func(*args, **kwargs)
        if not getattr(func, "is_view", False) and name not in NO_KERNEL_OPS:
            self.launches += 1
            if name in GATHER_OPS:
                self.bytes += 2 * _tensor_bytes(result) + _tensor_bytes((args[1:], kwargs))
            elif name in SCATTER_OPS:
                self.bytes += 2 * _tensor_bytes((args[1:], kwargs))
            else:
                self.bytes += _tensor_bytes((args, kwargs, result))
        return result

    @property
    def total(self) -> int:
        """Number of operators dispatched so far."""
        return sum(self.ops.values())


def _tensor_bytes(value: object) -> int:
    """Bytes of every tensor in a nest of tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(item) for item in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    return 0


def count_ops(function: Callable[[], T]) -> tuple[T, OpCounter]:
    """Run ``function`` once under an `OpCounter`; returns its result and the counter."""
    with torch.no_grad(), OpCounter() as counter:
        result = function()
    return result, counter


def selection_signals(batch: int, tokens: int, dim: int, *, heads: int = 32, prompt_tokens: int = 32,
                      clip_dim: int = 768, device: str = "cpu", seed: int = 0) -> Signals:
    """Random `Signals` with every field a built-in pipeline reads, at LLaVA-1.5-7B-like shapes.

    ``visual`` / ``prompt`` (B, N / T, D); ``attention`` and ``cls_attention`` (B, heads, N) softmax rows;
    ``visual_keys`` / ``prompt_keys`` (B, N / T, heads, D / heads); ``clip_visual`` (B, N, clip_dim) and
    one CLIP text embedding ``clip_text`` (B, 1, clip_dim); ``prompt_attention`` (B, heads, T, N) rows of the
    prompt tokens over the visual ones and ``prompt_mask`` (all real) (SparseVLM); ``grid`` when N is a square.
    """
    generator = torch.Generator().manual_seed(seed)
    head_dim = max(1, dim // heads)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device)

    side = math.isqrt(tokens)
    return Signals(
        visual=normal(batch, tokens, dim),
        prompt=normal(batch, prompt_tokens, dim),
        attention=torch.softmax(normal(batch, heads, tokens), dim=-1),
        cls_attention=torch.softmax(normal(batch, heads, tokens), dim=-1),
        visual_keys=normal(batch, tokens, heads, head_dim),
        prompt_keys=normal(batch, prompt_tokens, heads, head_dim),
        clip_visual=normal(batch, tokens, clip_dim),
        clip_text=normal(batch, 1, clip_dim),
        prompt_attention=torch.softmax(normal(batch, heads, prompt_tokens, tokens), dim=-1),
        prompt_mask=torch.ones(batch, prompt_tokens, dtype=torch.bool, device=device),
        grid=(side, side) if side * side == tokens else None,
    )
