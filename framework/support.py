"""Does an adapter support a pipeline? The one check, keyed on the kinds of the placement's drops.

A placement is data: ``placement.drops(budget)`` lists `Drop` points whose ``where`` is one of the drop kinds
``"vision"``, ``"pre_llm"``, ``"layer"`` or ``"vision_layers"`` (`DROP_KINDS`). An adapter declares the drop kinds it implements
(``drop_kinds``), the signals it fills at each (``provides(kind)``) and why something is missing
(``limitations``: drop kind, placement, signal or stage (``kind.name``) name -> reason). A pipeline is supported
when no stage of it is listed in ``limitations``, every drop kind of its placement is implemented and every signal it
requires is provided there, so a third-party placement whose
drops are ``"layer"`` drops works on every adapter without the adapter knowing its name.

`support_problems` lists the problems (one message each); `check_support` raises the first kind of problem:
`VtpruneError` for a drop kind the adapter does not implement, `MissingSignalError` for missing signals.
``framework.prune`` and the experiment config validation both call these, so they give the same messages.

The signal name sets (`EMBEDDING_SIGNALS`, ...) are re-exported from `vtprune.framework.signals`, their one home.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Optional

from .errors import MissingSignalError, VtpruneError
from .placements import PLACEMENT_WHERE
from .signals import (
    CLIP_SIGNALS,
    CLS_SIGNALS,
    EMBEDDING_SIGNALS,
    GRID_SIGNALS,
    LAYER_SIGNALS,
    VISION_SIGNALS,
)

__all__ = [
    "DROP_KINDS",
    "PLACEMENT_KINDS",
    "VISION_SIGNALS",
    "EMBEDDING_SIGNALS",
    "LAYER_SIGNALS",
    "CLS_SIGNALS",
    "CLIP_SIGNALS",
    "GRID_SIGNALS",
    "PLACEMENT_REQUESTS",
    "drop_kind",
    "provided_signals",
    "pipeline_drop_kinds",
    "adapter_drop_kinds",
    "SupportProblem",
    "support_report",
    "support_problems",
    "check_support",
]

#: The kinds of drop point an adapter may implement (``Drop.where``).
DROP_KINDS: tuple[str, ...] = PLACEMENT_WHERE
#: Built-in placement names -> the kind of their drops (lets ``provides`` take a built-in placement name too).
PLACEMENT_KINDS: Mapping[str, str] = MappingProxyType(
    {
        "vision": "vision",
        "pre_llm": "pre_llm",
        "pre_llm_clip": "pre_llm",
        "layer": "layer",
        "schedule": "layer",
        "sparse_layers": "layer",
        "vision_layers": "vision_layers",
    }
)

#: Built-in placement names -> signals the placement requests beyond its drop kind's (an adapter fills them only
#: where it lists them in ``on_request``, see `provided_signals`).
PLACEMENT_REQUESTS: Mapping[str, frozenset[str]] = MappingProxyType({"pre_llm_clip": CLIP_SIGNALS})


#: Budget used to read a placement's drop points when no budget is at hand (any valid budget gives the same kinds).
_PROBE_BUDGET = 1.0


def drop_kind(placement_or_kind: str) -> str:
    """The drop kind of a built-in placement name, or the drop kind itself; anything else raises `VtpruneError`."""
    if placement_or_kind in PLACEMENT_KINDS:
        return PLACEMENT_KINDS[placement_or_kind]
    raise VtpruneError(
        f"unknown drop kind or built-in placement {placement_or_kind!r}; drop kinds: {', '.join(DROP_KINDS)} "
        f"(built-in placements: {', '.join(PLACEMENT_KINDS)})"
    )


def provided_signals(adapter: Any, kind: str, requested: frozenset[str] = frozenset()) -> frozenset[str]:
    """Signals ``adapter`` fills at drops of ``kind`` for a placement declaring ``requested`` (its ``provides``):
    ``adapter.provides(kind)``, plus the signals of ``adapter.on_request[kind]`` the placement requests (signals
    an adapter computes only when asked, e.g. CLIP-space signals at ``pre_llm`` drops for ``pre_llm_clip``)."""
    on_request = frozenset((getattr(adapter, "on_request", None) or {}).get(kind, ()))
    return frozenset(adapter.provides(kind)) | (on_request & frozenset(requested))


def pipeline_drop_kinds(pipeline: Any) -> tuple[str, ...]:
    """The distinct ``Drop.where`` of ``pipeline.placement.drops(...)``, in model order."""
    drops = pipeline.placement.drops(_PROBE_BUDGET)
    kinds: list[str] = []
    for drop in drops:
        if drop.where not in kinds:
            kinds.append(drop.where)
    return tuple(kinds)


def adapter_drop_kinds(adapter: Any) -> frozenset[str]:
    """The drop kinds ``adapter`` (class or instance) implements: its ``drop_kinds``, or for an adapter that only
    lists built-in placement names (``placements``), their kinds."""
    kinds = getattr(adapter, "drop_kinds", None)
    if kinds is not None:
        return frozenset(kinds)
    return frozenset(PLACEMENT_KINDS[p] for p in getattr(adapter, "placements", ()) if p in PLACEMENT_KINDS)


def _model_name(adapter: Any, model_name: Optional[str]) -> str:
    if model_name:
        return model_name
    model = getattr(adapter, "model", None)
    if model is not None and not isinstance(adapter, type):
        return type(model).__name__
    classes = tuple(getattr(adapter, "model_classes", ()) or ())
    return classes[0] if classes else "the model"


@dataclass(frozen=True)
class SupportProblem:
    """One reason an adapter cannot run a pipeline (`support_report`).

    Attributes:
        error: `VtpruneError` (a drop kind the adapter does not implement) or `MissingSignalError`.
        message: the full message ``framework.prune`` raises.
        adapter: the adapter's name; placement: the placement's name; kind: the drop kind.
        missing: the signals the pipeline requires and the adapter does not fill there (empty for a drop kind).
        provided: the signals the adapter fills at that drop kind (empty for a drop kind it lacks).
        implemented: the built-in placements the adapter implements.
    """

    error: type
    message: str
    adapter: str
    placement: str
    kind: str
    missing: tuple[str, ...] = ()
    provided: tuple[str, ...] = ()
    implemented: tuple[str, ...] = ()


def _stage_keys(pipeline: Any) -> list[str]:
    """``kind.name`` of each stage of ``pipeline`` (none for a duck-typed pipeline without stages)."""
    keys = []
    for part in ("relevance", "critical", "diversity", "budget", "placement"):
        stage = getattr(pipeline, part, None)
        kind, stage_name = getattr(stage, "kind", None), getattr(stage, "name", None)
        if kind and stage_name:
            keys.append(f"{kind}.{stage_name}")
    return keys


def support_report(adapter: Any, pipeline: Any, *, model_name: Optional[str] = None) -> list[SupportProblem]:
    """The one support check: every `SupportProblem` of ``adapter`` (class or instance) with ``pipeline``
    (anything with ``placement`` and ``requires``); empty when supported. `support_problems`,
    `check_support` and the experiment config validation all read this."""
    model = _model_name(adapter, model_name)
    name = getattr(adapter, "name", type(adapter).__name__)
    placement = getattr(pipeline.placement, "name", None) or type(pipeline.placement).__name__
    notes = dict(getattr(adapter, "limitations", {}) or {})
    implemented = adapter_drop_kinds(adapter)
    placements = sorted(getattr(adapter, "placements", ()) or ())
    kinds_text = " / ".join(repr(k) for k in sorted(implemented)) or "no"
    problems: list[SupportProblem] = []
    kinds = pipeline_drop_kinds(pipeline)
    for key in _stage_keys(pipeline):  # a stage the adapter declares it cannot run (`limitations["kind.name"]`)
        if key in notes:
            message = (
                f"{model} (adapter {name!r}) does not run {key} at placement {placement!r} ({notes[key]}); use "
                "another preset for this model (docs/methods.md)"
            )
            problems.append(SupportProblem(VtpruneError, message, name, placement, kinds[0] if kinds else "",
                                           implemented=tuple(placements)))
    for kind in kinds:
        if kind not in implemented:
            reason = notes.get(kind) or notes.get(placement)
            why = f": {reason}" if reason else ""
            message = (
                f"{model} (adapter {name!r}): placement {placement!r} is not implemented (its drops are {kind!r} "
                f"drops, which the adapter does not implement{why}); use placement {', '.join(placements)} or any "
                f"placement whose drops are {kinds_text} drops (implemented drop kinds: {sorted(implemented)}; "
                f"built-in placements: {placements}) (docs/adapters.md)"
            )
            problems.append(SupportProblem(VtpruneError, message, name, placement, kind, implemented=tuple(placements)))
            continue
        provided = provided_signals(adapter, kind, frozenset(getattr(pipeline.placement, "provides", ()) or ()))
        unfilled = sorted(PLACEMENT_REQUESTS.get(placement, frozenset()) - provided)
        if unfilled:  # a placement that exists to add signals (pre_llm_clip) is not implemented without them
            reason = notes.get(placement)
            why = f" ({reason})" if reason else ""
            message = (
                f"{model} (adapter {name!r}) does not implement placement {placement!r}{why}: it adds {unfilled} "
                f"at {kind!r} drops, which the adapter cannot fill; use placement {', '.join(placements)}"
            )
            problems.append(
                SupportProblem(VtpruneError, message, name, placement, kind, tuple(unfilled), tuple(sorted(provided)), tuple(placements))
            )
            continue
        missing = sorted(set(pipeline.requires) - provided)
        if missing:
            signals_why = "".join(f" ({key}: {notes[key]})" for key in missing if key in notes)
            placement_why = f" ({notes[placement]})" if placement in notes and placement not in missing else ""
            message = (
                f"{model} (adapter {name!r}) cannot provide {missing} at placement {placement!r} ({kind!r} "
                f"drops){signals_why}, so it does not implement placement {placement!r}{placement_why}; at "
                f"{kind!r} drops it provides {sorted(provided)}"
            )
            problems.append(
                SupportProblem(
                    MissingSignalError, message, name, placement, kind, tuple(missing), tuple(sorted(provided)),
                    tuple(placements),
                )
            )
    return problems


def support_problems(adapter: Any, pipeline: Any, *, model_name: Optional[str] = None) -> list[str]:
    """Every reason ``adapter`` (class or instance) cannot run ``pipeline`` (anything with ``placement`` and
    ``requires``), one message each, naming the model class (``model_name``, default the adapter's model or its
    first model class) and adapter, the placement and drop kind, the reason from ``adapter.limitations`` and
    what is supported. An empty list means supported."""
    return [problem.message for problem in support_report(adapter, pipeline, model_name=model_name)]


def check_support(adapter: Any, pipeline: Any, *, model_name: Optional[str] = None) -> None:
    """Raise before anything is attached when `support_problems` finds a problem: `VtpruneError` for a drop kind
    the adapter does not implement (checked first), else `MissingSignalError` for missing signals."""
    problems = support_report(adapter, pipeline, model_name=model_name)
    for problem in problems:
        if problem.error is VtpruneError:
            raise VtpruneError(problem.message)
    if problems:
        raise MissingSignalError("; ".join(problem.message for problem in problems))
