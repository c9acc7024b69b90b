"""Placement ``decode``: a prefill placement plus a policy that hides visual KV-cache entries while decoding.

``decode(prefill='layer(k=2)', layer=2, keep=0.5, policy=attention, mode=dynamic)`` drops at prefill exactly as
its ``prefill`` placement does (its ``drops`` are the prefill placement's), and then, at every decoding step,
hides visual entries of the KV cache from decoder layers ``>= layer``:

``policy="attention"`` (step-wise attention pruning; the per-step form of MustDrop's decode stage)
    the current token's softmax attention at layer ``layer - 1`` (head mean, over that layer's cache) ranks the
    visual entries still present; each row keeps its top ``keep`` of them (an int: entries per row; a float:
    fraction of the visual entries the row had after prefill, ``resolve_budget`` rounding half up, at least
    one); ties go to the earlier entry. ``mode="dynamic"`` re-selects among every prefill-kept entry at each
    step (hidden entries may come back); ``mode="evict"`` selects among the entries not hidden before, so a
    hidden entry never returns (the same as deleting it from the cache).
``policy="dycoke"`` (DyCoke's dynamic KV-cache pruning, KD-TAO/DyCoke @ dd746349, ``modeling_qwen2.py``
    ``PrunableDynamicCache.dycoke_pruning`` / ``update_cache``)
    per row, the current token's head-mean attention at layer ``layer - 1`` over the visual entries present after
    prefill is compared (cosine) with the previous step's; when it is below ``threshold`` (always at the first step)
    layers ``>= layer`` see only the top ``int(n * (1 - prune_ratio))`` of the n visual entries (official
    arithmetic), otherwise nothing is hidden at this step (the official cache index is reset at every step and only
    rebuilt when the attention changed). ``keep`` is unused; ``mode="evict"`` ranks only entries never hidden.
``policy="final"`` (MustDrop's official decode stage, ``modelling_sparse_llama.py`` ``LlamaDynamicvitModel.forward``,
    "Sparse kv cache (decoding stage)")
    layers ``>= layer`` see only the visual tokens that survived the *last* prefill drop: the caches that the
    prefill filled before later drops are reduced to the final set. ``keep`` and ``mode`` are unused.

In a recipe it composes with a preset's or default placement: when ``prefill`` is not given, ``compose`` fills
it with the placement the recipe would otherwise use (``"zspaprune+decode(keep=0.5)"`` keeps ZSPAPrune's
``pre_llm``); see ``prefill_param`` and docs/architecture.md ("The decode placement"). Adapters act on it
through ``adapters/decode_hooks.py``; what each step hid is ``handle.last_selection.decode_records``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional

from vtprune.framework.errors import ParameterError
from vtprune.framework.recipe import parse_recipe
from vtprune.framework.signals import PLACEMENT_SIGNALS
from vtprune.framework.stages import Drop, LayerPlacement, stage_params

__all__ = ["DecodePlacement", "DECODE_POLICIES", "DECODE_MODES"]

DECODE_POLICIES: tuple[str, ...] = ("attention", "final", "dycoke")
DECODE_MODES: tuple[str, ...] = ("dynamic", "evict")


@dataclass(frozen=True, eq=False)
class DecodePlacement(LayerPlacement):
    """A prefill placement (``prefill``, a placement recipe term) plus a decode-time KV-cache policy."""

    name: ClassVar[str] = "decode"
    description: ClassVar[str] = (
        "the prefill placement `prefill`, then at every decoding step hide visual KV-cache entries from layers "
        ">= `layer` (top `keep` by the current token's attention, or MustDrop's final prefill set)"
    )
    #: The parameter ``compose`` fills with the recipe's other placement when a recipe does not give it.
    prefill_param: ClassVar[Optional[str]] = "prefill"
    provides: ClassVar[frozenset[str]] = PLACEMENT_SIGNALS["pre_llm"]
    prefill: str = "pre_llm"
    layer: int = 2
    keep: int | float = 0.5
    policy: Literal["attention", "final", "dycoke"] = "attention"
    mode: Literal["dynamic", "evict"] = "dynamic"
    #: policy ``dycoke``: the fraction of visual entries hidden at a pruned step (DyCoke's ``dycoke_p``).
    prune_ratio: float = 0.8
    #: policy ``dycoke``: a step prunes only when its attention's cosine to the previous step's is below this.
    threshold: float = 0.9

    def __post_init__(self) -> None:
        if self.layer < 1:
            raise ValueError(f"layer must be >= 1 (layer - 1 scores the step), got {self.layer}")
        if isinstance(self.keep, bool) or not (
            (isinstance(self.keep, int) and self.keep >= 1) or (isinstance(self.keep, float) and 0.0 < self.keep <= 1.0)
        ):
            raise ValueError(f"keep must be an int >= 1 or a float in (0, 1], got {self.keep!r}")
        if not 0.0 <= float(self.prune_ratio) < 1.0:
            raise ValueError(f"prune_ratio must be a float in [0, 1), got {self.prune_ratio!r}")
        if not -1.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be a cosine in [-1, 1], got {self.threshold!r}")
        # what this instance provides is its prefill placement's (the class value: the default prefill's)
        object.__setattr__(self, "provides", frozenset(self.inner.provides))

    @property
    def inner(self) -> LayerPlacement:
        """The prefill placement (built from ``prefill`` with the installed registry's placements)."""
        from vtprune.framework.registry import default_registry

        terms = parse_recipe(self.prefill)
        if len(terms) != 1 or terms[0].kind not in (None, "placement"):
            raise ValueError(f"prefill must name one placement, e.g. 'layer(k=2)', got {self.prefill!r}")
        name = terms[0].name
        if name == self.name:
            raise ValueError("prefill cannot be another decode placement")
        cls = default_registry().stage("placement", name)
        known = {spec.name for spec in stage_params(cls)}
        unknown = sorted(set(terms[0].params) - known)
        if unknown:
            raise ParameterError(f"prefill placement {name!r}: unknown parameter(s) {unknown}; valid: {sorted(known)}")
        return cls(**terms[0].params)

    def drops(self, budget: int | float) -> tuple[Drop, ...]:
        return self.inner.drops(budget)

    def drop_pipeline(self, pipeline: Any, number: int) -> Any:
        return self.inner.drop_pipeline(pipeline, number)  # the prefill placement's per-drop steps
