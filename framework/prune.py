"""`prune`: attach a pruning pipeline to one model instance with removable hooks.

>>> handle = prune(model, "zspaprune", budget=64)          # doctest: +SKIP
>>> out = model.generate(**inputs, max_new_tokens=32)       # doctest: +SKIP
>>> handle.last_selection.counts, handle.remove()           # doctest: +SKIP

or as a context manager: ``with prune(model, recipe, budget=0.25): ...``.

Nothing is assigned on the model: the adapter registers forward (pre-)hooks on modules of that one
instance and keeps all state on the handle; ``remove()`` leaves the model bit-identical to before.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from .budget import normalize_budget
from .compiled import CompiledPipeline
from .pipeline import Pipeline
from .stages import zero_budget_allowed
from .errors import UnknownNameError, VtpruneError
from .support import check_support

__all__ = ["prune", "PruneHandle", "adapter_for"]

POSITIONS = ("keep", "compact")


def adapter_for(model: Any, registry: Any = None, adapter: Any = None) -> type:
    """The adapter class for ``model``, from the registry only (the built-in adapters are registered by the
    ``vtprune.adapters.plugin`` plugin): the one registered under the name ``adapter`` when given (an adapter
    class is used as is), else the one whose ``model_classes`` names the model's class or a base of it."""
    from .registry import default_registry

    if adapter is not None and not isinstance(adapter, str):
        return adapter
    table = default_registry(registry)
    if adapter is None:
        return table.adapter_for(model)
    if adapter not in table.adapters:
        raise UnknownNameError("adapter", adapter, table.adapters)
    return table.adapters[adapter].obj


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
        self._attachment.budget = normalize_budget(value, allow_zero=zero_budget_allowed(self.pipeline))

    @property
    def last_selection(self) -> Any:
        """`vtprune.adapters.records.PruneResult` of the last pruned prefill (None before the first one):
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
    adapter: Any = None,
    compile: bool | Mapping[str, Any] = False,
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
            (`normalize_budget`: a per-image budget becomes a tuple of ints / floats). The count 0 (no visual
            token) only where the placement withdraws every visual token (``withdraw``, the `vtw` preset).
        positions: "keep" (kept tokens keep their position ids) or "compact" (renumbered).
        prompt_stop: token ids marking the end of the user turn (see docs/adapters.md, prompt span).
        registry: the registry for ``compose`` and adapter lookup (default: installed plugins).
        adapter: the registered adapter name (or an adapter class) to attach with; default: the registry's adapter
            for the model's class (`adapter_for`).
        compile: select with `Pipeline.compile()` (``torch.compile``; a mapping gives its options, e.g.
            ``{"mode": "reduce-overhead"}`` on a GPU): drops whose signals are unpadded and whose budget is an
            int run one compiled graph, the rest the eager ``select`` (identical selections). A pipeline that
            cannot compile raises `SelectCompileError` here or at its first drop (framework/compiled.py).
        **params: stage parameters for ``compose``, and the adapter's options: the names the adapter class lists
            in ``options`` go to the adapter's runtime instead (LLaVA family: ``clip_model``, ``tokenizer``,
            ``clip_tokenizer`` for the ``pre_llm_clip`` placement, docs/adapters.md).
    """
    if positions not in POSITIONS:
        raise VtpruneError(f"positions must be one of {POSITIONS}, got {positions!r}")
    adapter = adapter_for(model, registry, adapter)
    option_names = frozenset(getattr(adapter, "options", ()) or ())
    options = {name: params.pop(name) for name in list(params) if name in option_names}
    if hasattr(recipe, "select") and hasattr(recipe, "placement") and not params:
        pipeline = recipe
    else:
        from .compose import compose

        pipeline = compose(recipe, registry=registry, **params)
    budget = normalize_budget(budget, allow_zero=zero_budget_allowed(pipeline))  # 0: only a withdrawing placement
    check_support(adapter, pipeline, model_name=type(model).__name__)
    if compile:
        if not isinstance(pipeline, Pipeline):
            raise VtpruneError(f"compile=True needs a composed Pipeline (a recipe), got {type(pipeline).__name__}")
        pipeline = CompiledPipeline(pipeline, **(dict(compile) if isinstance(compile, Mapping) else {}))
    attachment = adapter.runtime(
        adapter(model),
        pipeline,
        budget,
        positions=positions,
        prompt_stop=prompt_stop,
        plan_factory=adapter.plan_factory,
        **options,
    )
    return PruneHandle(model, pipeline, adapter, attachment, positions)
