"""`prune`: attach a pruning pipeline to one model instance with removable hooks.

>>> handle = prune(model, "zspaprune", budget=64)          # doctest: +SKIP
>>> out = model.generate(**inputs, max_new_tokens=32)       # doctest: +SKIP
>>> handle.last_selection.counts, handle.remove()           # doctest: +SKIP

or as a context manager: ``with prune(model, recipe, budget=0.25): ...``.

Nothing is assigned on the model: the adapter registers forward (pre-)hooks on modules of that one
instance and keeps all state on the handle; ``remove()`` leaves the model bit-identical to before.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from .budget import normalize_budget
from .errors import MissingSignalError, RegistrationError, VtpruneError

__all__ = ["prune", "PruneHandle", "adapter_for"]

POSITIONS = ("keep", "compact")


def adapter_for(model: Any, registry: Any = None) -> type:
    """The adapter class for ``model``: the registry's adapters, then the built-in ones (single switch point)."""
    from .registry import default_registry

    error: Optional[Exception] = None
    try:
        return default_registry(registry).adapter_for(model)
    except RegistrationError as exc:  # the registry may not list the built-in adapters
        error = exc
    from vtprune.adapters.plugin import BUILTIN_ADAPTERS

    for klass in type(model).__mro__:
        for adapter in BUILTIN_ADAPTERS:
            if klass.__name__ in adapter.model_classes:
                return adapter
    registered = []
    try:
        registered = [c for e in default_registry(registry).adapters.values() for c in e.obj.model_classes]
    except Exception:  # pragma: no cover - registry construction problems are reported by `error`
        pass
    supported = sorted(set(registered) | {c for a in BUILTIN_ADAPTERS for c in a.model_classes})
    raise RegistrationError(
        f"no vtprune adapter supports {type(model).__name__}; supported model classes: {', '.join(supported)} "
        "(write one: docs/adapters.md)"
    ) from error


class PruneHandle:
    """The attachment of one pipeline to one model. A context manager; ``remove()`` detaches.

    Attributes:
        model: the model instance.
        pipeline: the composed pipeline.
        adapter: the adapter class used.
        positions: "keep" or "compact".
    """

    def __init__(self, model: Any, pipeline: Any, adapter: type, attachment: Any, positions: str):
        self.model = model
        self.pipeline = pipeline
        self.adapter = adapter
        self.positions = positions
        self._attachment = attachment

    @property
    def budget(self) -> Any:
        """Budget of the next forwards: int, float, or one value per image; assignable."""
        return self._attachment.budget

    @budget.setter
    def budget(self, value: Any) -> None:
        """Validate and normalise (`normalize_budget`) before storing: a rejected value raises
        `BudgetError` and leaves the current budget in place."""
        self._attachment.budget = normalize_budget(value)

    @property
    def last_selection(self) -> Any:
        """`vtprune.adapters.base.PruneResult` of the last pruned prefill (None before the first one):
        ``.selection`` / ``.counts`` (final kept tokens per image, image-token coordinates),
        ``.drops`` (one record per drop) and ``.per_layer_counts`` for schedules, ``.sequence_index`` (the
        original position of every output slot)."""
        return self._attachment.last_result if self._attachment is not None else None

    @property
    def active(self) -> bool:
        return self._attachment is not None and bool(self._attachment._handles)

    def remove(self) -> None:
        """Remove every hook; idempotent. The last selection stays readable."""
        if self._attachment is not None:
            self._attachment.remove()

    def __enter__(self) -> "PruneHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PruneHandle({type(self.model).__name__}, {self.pipeline}, budget={self.budget!r}, {self.positions}, {state})"


def prune(
    model: Any,
    recipe: Any,
    budget: Any = 64,
    *,
    positions: str = "keep",
    prompt_stop: Optional[Sequence[int]] = None,
    registry: Any = None,
    **params: Any,
) -> PruneHandle:
    """Attach a pruning pipeline to ``model`` (one instance) and return a removable `PruneHandle`.

    Args:
        model: a supported Hugging Face VLM (see docs/adapters.md).
        recipe: a recipe string/dict for ``compose``, or an already composed pipeline (any object with
            ``select``, ``requires`` and ``placement``).
        budget: visual tokens kept per image (int), fraction kept (float in (0, 1]), or one of those per
            image of each forward (a list / tuple / 1-D tensor whose length is the number of images).
            Validated here, before anything is attached (`BudgetError`), and normalised once
            (`normalize_budget`: a per-image budget becomes a tuple of ints / floats).
        positions: "keep" (kept tokens keep their position ids) or "compact" (renumbered).
        prompt_stop: token ids marking the end of the user turn (see docs/adapters.md, prompt span).
        registry: the registry for ``compose`` and adapter lookup (default: installed plugins).
        **params: stage parameters for ``compose``, and the adapter's options: the names the adapter class lists
            in ``options`` go to ``adapter.attach`` instead (LLaVA family: ``clip_model``, ``tokenizer``,
            ``clip_tokenizer`` for the ``pre_llm_clip`` placement, docs/adapters.md).
    """
    budget = normalize_budget(budget)
    if positions not in POSITIONS:
        raise VtpruneError(f"positions must be one of {POSITIONS}, got {positions!r}")
    adapter = adapter_for(model, registry)
    option_names = frozenset(getattr(adapter, "options", ()) or ())
    options = {name: params.pop(name) for name in list(params) if name in option_names}
    if hasattr(recipe, "select") and hasattr(recipe, "placement") and not params:
        pipeline = recipe
    else:
        from .compose import compose

        pipeline = compose(recipe, registry=registry, **params)
    placement = pipeline.placement.name
    notes = getattr(adapter, "limitations", {}) or {}
    if placement not in adapter.placements:
        why = f" ({notes[placement]})" if placement in notes else ""
        raise VtpruneError(
            f"adapter {adapter.name!r} ({type(model).__name__}) does not implement placement {placement!r}{why}; it implements "
            f"{', '.join(sorted(adapter.placements))}"
        )
    missing = sorted(set(pipeline.requires) - set(adapter.provides(placement)))
    if missing:
        why = "".join(f" ({name}: {notes[name]})" for name in missing if name in notes)
        raise MissingSignalError(
            f"adapter {adapter.name!r} ({type(model).__name__}) cannot provide {missing} at placement {placement!r}{why}; it provides "
            f"{sorted(adapter.provides(placement))}"
        )
    attachment = adapter.attach(model, pipeline, budget, positions=positions, prompt_stop=prompt_stop, **options)
    return PruneHandle(model, pipeline, adapter, attachment, positions)
