"""What a drop plan (``adapters.plan.Plan``) is given besides the forward: the attachment's fixed settings
(`PlanContext`), and the check that a placement's drops are ones the runtime can apply (`check_drops`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from torch import Tensor

from .records import PruneResult

__all__ = ["INPUT_DROPS", "PlanContext", "check_drops"]

#: Drop kinds applied at the decoder input (layer 0).
INPUT_DROPS = ("vision", "vision_layers", "pre_llm")


@dataclass(frozen=True)
class PlanContext:
    """What a plan needs besides the forward: fixed for one attachment.

    Attributes:
        adapter: the adapter description (instance) of the model.
        pipeline: the composed pipeline (``select``, ``requires``, ``placement``).
        requires: the pipeline's required signals.
        hints: the union of the stages' ``adapter_hints``.
        keep_cls: VisionZip ``keep_cls=True`` at ``vision``.
        clip: `ClipSignals` for CLIP-space signals, or None.
        prompt_stop: token ids ending the user turn, or None.
        num_layers: decoder layers of the language model.
        project: vision-space values (..., n, Dv) -> LLM tokens (..., n, D), run by the runtime.
        publish: receives the `PruneResult` of the finished prefill.
        tower_merge: the in-tower merging hooks (`adapters.tower_merge.TowerMerge`) of a ``vision_layers``
            placement, or None.
    """

    adapter: Any
    pipeline: Any
    requires: frozenset
    hints: frozenset
    keep_cls: bool
    clip: Any
    prompt_stop: Optional[list]
    num_layers: int
    project: Callable[[Tensor], Tensor]
    publish: Callable[[PruneResult], None]
    tower_merge: Any = None


def check_drops(drops: Sequence[Any], num_layers: int, after_last: bool = False) -> None:
    """Raise ``ValueError`` for drops the runtime cannot apply: more than one at the decoder input, an unknown
    kind, or a layer outside ``1..num_layers - 1`` (``1..num_layers`` with ``after_last``: a placement whose drop
    after the last layer drops nothing, `LayerPlacement.drops_after_last_layer`)."""
    at_input = [d for d in drops if d.where in INPUT_DROPS]
    if len(at_input) > 1:
        raise ValueError("at most one vision / vision_layers / pre_llm drop per pipeline")
    last = num_layers if after_last else num_layers - 1
    for drop in drops:
        if drop.where not in (*INPUT_DROPS, "layer"):
            raise ValueError(f"unknown drop point {drop.where!r}")
        if drop.where == "layer" and not 1 <= int(drop.layer) <= last:
            raise ValueError(
                f"layer drop before layer {drop.layer}: the language model has {num_layers} layers (valid k: 1..{last})"
            )
