"""Latency and peak memory of prefill and decode, measured from outside the model.

`PhaseMeter` is an observer: forward pre/post hooks on the model's top module (removed on exit),
nothing inside any method. Between ``begin()`` and ``end()`` (one ``generate`` call), the first
forward is the prefill and every later one a decode step. On CUDA the times come from CUDA events
and the peaks from ``torch.cuda.max_memory_allocated`` (reset between the phases); on CPU from
``time.perf_counter`` and the process's resident set size sampled at the phase boundaries.

>>> import torch
>>> layer = torch.nn.Linear(4, 4)
>>> with PhaseMeter(layer) as meter:
...     meter.begin(); _ = layer(torch.ones(2, 4)); _ = layer(torch.ones(1, 4)); numbers = meter.end()
>>> numbers["decode_steps"], numbers["prefill_s"] >= 0
(1, True)
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import torch

__all__ = ["PhaseMeter", "rss_bytes"]


def rss_bytes() -> Optional[int]:
    """Resident set size of this process (Linux ``/proc``), else None."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PhaseMeter:
    """Prefill / decode timing and peak memory of one module (a context manager holding the hooks)."""

    def __init__(self, module: torch.nn.Module, device: Any = None) -> None:
        self.module = module
        if device is None:
            parameter = next(module.parameters(), None)
            device = parameter.device if parameter is not None else torch.device("cpu")
        self.cuda = torch.device(device).type == "cuda"
        self._handles: list[Any] = []
        self._marks: list[tuple[Any, Any]] = []
        self._open: Any = None
        self._prefill_peak: Optional[int] = None
        self._decode_peak: Optional[int] = None

    def __enter__(self) -> "PhaseMeter":
        self._handles = [
            self.module.register_forward_pre_hook(self._before),
            self.module.register_forward_hook(self._after, always_call=True),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- hooks --------------------------------------------------------------------------------------

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _before(self, module: Any, args: Any) -> None:
        if self._open is None:
            self._open = self._now()

    def _after(self, module: Any, args: Any, output: Any) -> None:
        if self._open is None:
            return
        self._marks.append((self._open, self._now()))
        self._open = None
        if len(self._marks) == 1:  # the prefill: its peak, then reset for the decode steps
            self._prefill_peak = self._peak()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
        elif not self.cuda:
            self._decode_peak = max(self._decode_peak or 0, rss_bytes() or 0) or None

    def _peak(self) -> Optional[int]:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        return rss_bytes()

    # -- phases -------------------------------------------------------------------------------------

    def begin(self) -> None:
        """Start measuring one generation."""
        self._marks, self._open = [], None
        self._prefill_peak = self._decode_peak = None
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def end(self) -> dict[str, Any]:
        """Numbers of the generation since `begin`: ``prefill_s``, ``decode_s`` (all decode steps),
        ``decode_steps``, ``prefill_peak_bytes``, ``decode_peak_bytes``, ``memory_kind``."""
        if self.cuda:
            torch.cuda.synchronize()
            if len(self._marks) > 1:
                self._decode_peak = int(torch.cuda.max_memory_allocated())
        durations = [self._elapsed(start, stop) for start, stop in self._marks]
        return {
            "prefill_s": durations[0] if durations else None,
            "decode_s": sum(durations[1:]) if len(durations) > 1 else 0.0,
            "decode_steps": max(len(durations) - 1, 0),
            "prefill_peak_bytes": self._prefill_peak,
            "decode_peak_bytes": self._decode_peak,
            "memory_kind": "cuda_allocated" if self.cuda else "process_rss",
        }

    def _elapsed(self, start: Any, stop: Any) -> float:
        if self.cuda:
            return float(start.elapsed_time(stop)) / 1000.0
        return float(stop - start)
