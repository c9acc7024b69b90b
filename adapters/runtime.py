"""The one hook runtime: `attach` any adapter description (``adapters.description.VLMAdapter``) to its model.

`Attachment` holds the removable hooks of one pipeline on one model instance and the state of the last forward:
a forward pre-hook / hook on the multimodal model records the call in flight (`ForwardCall`), the description's
vision capture (``adapter.vision_hooks()``) records the vision side, the decoder machinery
(``adapters.decoder.DecoderPruner``) asks the controller for a drop plan at every prefill, and the description's
``extensions()`` add what the family needs besides (Qwen's M-RoPE positions, Qwen3's DeepStack). The plan is
built by a *plan factory* (`Plan` by default) from data only: the call, the embeddings and masks, the capture,
the budget and a `PlanContext`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Optional, Sequence

from torch import Tensor

from vtprune.framework.budget import normalize_budget
from vtprune.framework.errors import MissingSignalError, VtpruneError
from vtprune.framework.hints import HINT_FULL_WIDTH_CLS
from vtprune.framework.stages import pipeline_at_drop, zero_budget_allowed
from vtprune.framework.support import CLIP_SIGNALS, check_support

from .capture import VisionCapture
from .clip_signals import ClipSignals
from .decode_hooks import DecodeHooks, decode_policy_of
from .decoder import DecoderPruner
from .plan import ForwardCall, Plan, PlanContext, check_drops
from .records import PruneResult
from .tower_merge import tower_merge_for

__all__ = ["Attachment", "attach", "PlanFactory", "pipeline_hints", "pipeline_keeps_cls"]

#: ``(context, call, embeds, image_mask, mask2d, capture, budget) -> DropPlan``.
PlanFactory = Callable[..., Any]


def pipeline_hints(pipeline: Any) -> frozenset[str]:
    """Union of the ``adapter_hints`` of the pipeline's stages (empty for duck-typed pipelines without stages)."""
    hints: set[str] = set()
    for stage in getattr(pipeline, "stages", ()) or ():
        hints |= set(getattr(stage, "adapter_hints", ()) or ())
    return frozenset(hints)


def pipeline_keeps_cls(pipeline: Any) -> bool:
    """Whether the pipeline asks for the vision CLS token to be kept (VisionZip: ``budget.visionzip(keep_cls=True)``)."""
    return bool(getattr(getattr(pipeline, "budget", None), "keep_cls", False))


def attach(
    adapter: Any,
    pipeline: Any,
    budget: Any,
    *,
    positions: str = "keep",
    prompt_stop: Optional[Sequence[int]] = None,
    plan_factory: PlanFactory = Plan,
    **options: Any,
) -> "Attachment":
    """Install the hooks of ``pipeline`` on the model of ``adapter`` (a description instance); see `Attachment`.

    ``options`` are the names in ``adapter.options`` (LLaVA family: ``clip_model`` / ``tokenizer`` /
    ``clip_tokenizer``, used by pipelines needing CLIP-space signals, see `ClipSignals`, ignored otherwise).
    """
    unknown = sorted(set(options) - set(adapter.options))
    if unknown:
        raise TypeError(f"adapter {adapter.name!r}: unknown option(s) {unknown}; valid: {sorted(adapter.options)}")
    return Attachment(adapter, pipeline, budget, positions=positions, prompt_stop=prompt_stop, plan_factory=plan_factory, **options)


class Attachment:
    """Hooks of one pruning pipeline on one model instance.

    ``last_result`` is the :class:`PruneResult` of the last pruned prefill; ``budget`` may be changed between
    forwards (int, float or one value per image). ``remove()`` removes every hook.
    """

    def __init__(
        self,
        adapter: Any,
        pipeline: Any,
        budget: Any,
        *,
        positions: str,
        prompt_stop: Optional[Sequence[int]] = None,
        plan_factory: PlanFactory = Plan,
        clip_model: Any = None,
        tokenizer: Any = None,
        clip_tokenizer: Any = None,
    ):
        check_support(adapter, pipeline, model_name=type(adapter.model).__name__)
        self.adapter = adapter
        self.pipeline = pipeline
        self.budget = budget  # validated and normalised by the property setter
        self.positions = positions
        self.prompt_stop = list(prompt_stop) if prompt_stop is not None else None
        self.placement = pipeline.placement
        probe = self.placement.drops(self.budget[0] if isinstance(self.budget, tuple) else self.budget)
        # what every drop's pipeline reads (a placement may run another step at a later drop: `drop_pipeline`)
        self.requires = frozenset(pipeline.requires).union(
            *(pipeline_at_drop(pipeline, i).requires for i in range(len(probe)))
        )
        self.hints = pipeline_hints(pipeline).union(*(pipeline_hints(pipeline_at_drop(pipeline, i)) for i in range(len(probe))))
        self.plan_factory = plan_factory
        self.last_result: Optional[PruneResult] = None
        self._calls: list[Optional[ForwardCall]] = []
        self._projecting = False
        self._handles: list = []
        self._extensions = tuple(adapter.extensions())
        spec = adapter.decoder_spec()
        check_drops(probe, len(spec.layers), getattr(self.placement, "drops_after_last_layer", False))
        self.keep_cls = pipeline_keeps_cls(pipeline)
        if self.keep_cls:
            if not any(d.where == "vision" for d in probe):
                raise VtpruneError(
                    f"keep_cls=True is honoured at the vision placement only (this pipeline drops at "
                    f"{sorted({d.where for d in probe})}); use placement vision or keep_cls=False"
                )
            if not adapter.supports_keep_cls:
                raise VtpruneError(
                    f"adapter {adapter.name!r} cannot keep the CLS token (keep_cls=True): its images are several crops "
                    "with newline tokens; use keep_cls=False"
                )
        self.clip: Optional[ClipSignals] = None
        if self.requires & CLIP_SIGNALS:
            if clip_model is None:
                raise MissingSignalError(
                    f"the pipeline needs {sorted(self.requires & CLIP_SIGNALS)} (CLIP-space signals, placement "
                    f"{getattr(self.placement, 'name', '?')!r}) but no CLIP model was given: pass "
                    "framework.prune(..., clip_model=<CLIPModel or path of the vision tower's CLIP checkpoint>, "
                    "tokenizer=<the VLM's tokenizer or processor>)"
                )
            self.clip = ClipSignals(clip_model, tokenizer, adapter.tower, clip_tokenizer=clip_tokenizer)
        self.tower_merge = tower_merge_for(adapter, pipeline, probe, lambda: self.budget)  # placement vision_layers
        self.context = PlanContext(
            adapter=adapter,
            pipeline=pipeline,
            requires=self.requires,
            hints=self.hints,
            keep_cls=self.keep_cls,
            clip=self.clip,
            prompt_stop=self.prompt_stop,
            num_layers=len(spec.layers),
            project=self._project,
            publish=self._publish,
            tower_merge=self.tower_merge,
        )
        self.decoder = DecoderPruner(spec, self._controller, positions=positions)
        try:
            self._install(probe)
        except BaseException:
            self.remove()  # never leave a partial attachment behind
            raise

    def _install(self, probe: Sequence[Any]) -> None:
        adapter = self.adapter
        vlm = adapter.vlm
        self._vlm_params = [n for n in inspect.signature(vlm.forward).parameters if n not in ("self", "kwargs")]
        self._handles.append(vlm.register_forward_pre_hook(self._vlm_pre, with_kwargs=True))
        self._handles.append(vlm.register_forward_hook(self._vlm_post, with_kwargs=True, always_call=True))
        self._handles.extend(self.decoder.attach())
        vision_drop = any(d.where == "vision" for d in probe)
        needs = adapter.capture_needs(self.requires, vision_drop, self.keep_cls)
        if HINT_FULL_WIDTH_CLS in self.hints:  # PruMerge: the following layer's CLS row, one full-width head
            needs = dataclasses.replace(needs, full_width=True)
        self._vision = None
        if needs.cls or needs.cls_token or vision_drop or self.clip is not None:
            self._vision = adapter.vision_hooks()
            self._handles.extend(self._vision.install(adapter, needs, lambda: self._projecting))
        if self.tower_merge is not None:
            self._handles.extend(self.tower_merge.install())
        for extension in self._extensions:
            self._handles.extend(extension.install(self))
        decode = decode_policy_of(self.placement)
        if decode is not None:  # placement ``decode``: hooks after the pruner's (adapters/decode_hooks.py)
            self._handles.extend(DecodeHooks(self, self.decoder.spec, decode).install())

    @property
    def budget(self) -> Any:
        """The budget of the next forwards, normalised (`normalize_budget`): an int, a float, or a tuple with one
        of those per image of each forward."""
        return self._budget

    @budget.setter
    def budget(self, value: Any) -> None:
        self._budget = normalize_budget(value, allow_zero=zero_budget_allowed(self.pipeline))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.decoder.remove()
        self._calls.clear()
        for extension in self._extensions:
            extension.remove()

    # -- what the plan calls back -----------------------------------------------------------------------

    def _project(self, values: Tensor) -> Tensor:
        """``adapter.project`` with the vision hooks muted (the runtime's own projector run is not a capture)."""
        self._projecting = True
        try:
            return self.adapter.project(values)
        finally:
            self._projecting = False

    def _publish(self, result: PruneResult) -> None:
        self.last_result = result

    # -- model hooks ------------------------------------------------------------------------------------

    def _vlm_pre(self, module, args, kwargs):
        bound = dict(kwargs)
        for name, value in zip(self._vlm_params, args):
            bound.setdefault(name, value)
        visual = any(bound.get(key) is not None for key in self.adapter.pixel_kwargs) or bool(
            bound.get("mm_encoder_outputs")
        )
        kinds = self.adapter.placeholder_kinds(module.get_input_embeddings(), bound) if visual else None
        image_mask = kinds >= 0 if kinds is not None else None
        self._calls.append(ForwardCall(bound.get("input_ids"), image_mask, image_mask is not None, bound, kind_ids=kinds))
        return None

    def _vlm_post(self, module, args, kwargs, output):
        if self._calls:
            self._calls.pop()
        return None

    def current_call(self) -> Optional[ForwardCall]:
        """The multimodal forward in flight (innermost), or None."""
        return self._calls[-1] if self._calls else None

    def _controller(self, embeds: Tensor, mask2d: Tensor, positions: Tensor) -> Optional[Any]:
        call = self.current_call()
        if call is None or not call.has_images or call.image_mask is None:
            return None
        image_mask = call.image_mask.to(embeds.device)  # (B, L)
        if image_mask.shape != mask2d.shape or not bool(image_mask.any()):
            return None
        capture = self._vision.take() if self._vision is not None else VisionCapture()
        return self.plan_factory(self.context, call, embeds, image_mask, mask2d, capture, self.budget)
