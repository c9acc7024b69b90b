"""ToMe inside a CLIP-style vision tower (placement ``vision_layers``), with removable hooks on one instance.
(`tower_merge_for` hands a pipeline whose relevance stage is ``flowcut`` to `adapters.tower_flowcut` instead.)

Official ToMe (github.com/facebookresearch/ToMe @ af95e4b1, ``tome/patch/timm.py`` ``ToMeBlock.forward``) merges in
every block *between* the attention and the MLP, with the block's keys averaged over heads as the metric, and adds
``log(size)`` to the attention logits of every later block (proportional attention). A CLIP encoder layer
(``CLIPEncoderLayer.forward``: ``h = x + attn(ln1(x)); out = h + mlp(ln2(h))``) offers no hook between the two
residual adds, so each merging layer gets:

* a forward pre-hook on the layer that runs the layer's own ``layer_norm1`` and ``self_attn`` on its input (the
  ``log(size)`` bias passed as the attention mask CLIP's attention adds to its logits; the keys read by a hook on
  ``k_proj``), adds the residual, merges (`vtprune.strategies.functional.tome`: ``bipartite_matching`` with the
  class token protected, ``merge_wavg``, ``merge_slots``) and hands the merged ``h`` to the layer as its input;
* a forward pre-hook / hook pair on the layer's ``self_attn`` that, for that one call, runs the attention on a
  single token and returns zeros, so the layer computes ``h + 0 + mlp(ln2(h))``: exactly the official block,
  with the attention computed once.

Layers after the last merging layer only get the ``log(size)`` bias (through their attention-mask argument).
The tower's output tokens are ``[CLS, unmerged, merged]`` in ToMe's order. Layout ``"first"`` (LLaVA-1.5, Video-LLaVA's
image tower): the projector output is padded back to the image's placeholder count with zeros and
`apply_tower_merge` drops the placeholders beyond the reduced count at the decoder input, like any drop (the LLM
receives the reduced sequence, in ToMe's token order, in the image's first placeholder slots); a forward with video
rows raises (video towers are not hooked). Layout ``"sources"`` (LLaVA-NeXT's AnyRes crops, which the model packs
itself): every patch position gets its merged token's projected value and `adapters.tower_scatter.apply_sources`
keeps one representative placeholder per merged token. The budget resolves per tower input (per crop): the hooks
see a flat batch of crops (``generate`` encodes the images before any forward, without their sizes). Output hidden
states are the layers' outputs as usual (``hidden_states[0]``, the embeddings, is recorded as the first merging
layer's modified input when that layer is layer 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from vtprune.framework.selection import Selection
from vtprune.strategies.functional.tome import parse_r, tower_merge_step

from .decoder import Decision, DropState
from .records import DropRecord
from .tower_flowcut import TowerFlowCut, apply_tower_flowcut
from .tower_scatter import apply_sources

__all__ = ["TowerMerge", "TowerRun", "merge_schedule", "apply_tower_merge", "tower_merge_for"]


def merge_schedule(tokens: int, keep: int, layers: int, r: int = 0, protected: int = 1) -> list[int]:
    """Tokens removed at each of ``layers`` merging layers, from ``tokens`` (class token included) down to ``keep``
    patches (never fewer). ``r = 0``: the removals spread as evenly as ToMe's half rule allows (earlier layers take
    the remainder) and the last layer removes whatever is left (in several matching rounds if it is more than half),
    so exactly ``keep`` remain; ``r > 0``: the official constant ``r`` per layer (``parse_r``, each clamped by the
    half rule), stopping at ``keep``."""
    plan = []
    current = tokens
    remaining = max(tokens - protected - keep, 0)
    constant = parse_r(layers, r) if r > 0 else None
    for number in range(layers):
        want = constant[number] if constant is not None else math.ceil(remaining / (layers - number))
        last = constant is None and number == layers - 1
        step = max(0, min(want, remaining) if last else min(want, remaining, (current - protected) // 2))
        plan.append(step)
        current -= step
        remaining -= step
    return plan


@dataclass
class TowerRun:
    """One merged tower run.

    Attributes:
        schedule: tokens removed per merging layer.
        size: (B, t, 1) token sizes after the last merge (class token first).
        slots: (B, T0) long, the final slot of every original token (class token = slot 0).
    """

    schedule: list[int]
    size: Optional[Tensor] = None
    slots: Optional[Tensor] = None
    projected: Optional[Tensor] = None  # (B, t - 1, D) merged tokens through the projector ("sources" layout)
    keys: Optional[Tensor] = None
    inner: bool = False
    skip: bool = False
    done: list = field(default_factory=list)


class TowerMerge:
    """ToMe hooks on one adapter's vision tower (CLIP-style: ``encoder.layers[i]`` with ``layer_norm1``, ``self_attn``
    (``k_proj``, ``num_heads``, ``head_dim``), a CLS token at position 0).

    Args:
        adapter: the adapter description instance (``tower``, ``projector``, ``config``; its ``tower_layout``:
            ``"first"`` (default: the merged tokens fill the image's first placeholder slots, LLaVA-1.5) or
            ``"sources"`` (every original patch position carries its merged token's value, so the model's own
            packing is unchanged; `adapters.tower_scatter` keeps one representative per merged token, LLaVA-NeXT)).
        r: the placement's ``r`` (0 = derived from the budget).
        keep_of: returns the patches to keep of a tower input (one crop) with ``n`` patches (the resolved budget).
    """

    def __init__(self, adapter: Any, r: int, keep_of: Callable[[int], int]):
        tower = adapter.tower
        if getattr(getattr(tower, "embeddings", None), "class_embedding", None) is None:
            raise ValueError(f"{type(tower).__name__} has no CLS token: placement vision_layers needs a CLIP-style tower")
        layer = adapter.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError("placement vision_layers needs a single vision_feature_layer (got a list)")
        if adapter.config.vision_feature_select_strategy != "default":
            raise ValueError("placement vision_layers needs vision_feature_select_strategy='default' (CLS removed)")
        self.adapter = adapter
        self.layers = list(tower.encoder.layers)
        self.feature = len(self.layers) + layer if layer < 0 else max(layer - 1, 0)  # last layer whose output is used
        self.r = int(r)
        self.keep_of = keep_of
        self.layout = getattr(adapter, "tower_layout", "first")
        side = adapter.patch_side()
        self.patches = side * side
        self.run: Optional[TowerRun] = None
        self.last: Optional[TowerRun] = None

    def install(self) -> list:
        handles = [self.adapter.vision_entry.register_forward_pre_hook(self._start)]
        for number, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(self._layer_hook(number), with_kwargs=True))
            handles.append(layer.self_attn.register_forward_pre_hook(self._attn_pre, with_kwargs=True))
            handles.append(layer.self_attn.register_forward_hook(self._attn_post))
            handles.append(layer.self_attn.k_proj.register_forward_hook(self._keys))
        handles.append(self.adapter.projector.register_forward_hook(self._pad))
        return handles

    def take(self) -> Optional[TowerRun]:
        """The last finished tower run (None when the tower has not run while attached)."""
        return self.last

    # -- hooks ------------------------------------------------------------------------------------------------

    def _start(self, module, args):
        keep = self.keep_of(self.patches)
        self.run = TowerRun(merge_schedule(self.patches + 1, keep, self.feature + 1, self.r))
        self.last = self.run  # filled in as the layers run
        return None

    def _keys(self, module, args, output):
        if self.run is not None and self.run.inner:
            self.run.keys = output  # (B, t, D)
        return None

    def _attn_pre(self, module, args, kwargs):
        if self.run is None or not self.run.skip:
            return None
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, t, D)
        kwargs = {**kwargs, "hidden_states": hidden[:, :1], "attention_mask": None}  # (B, 1, D): a 1-token stand-in
        return args[1:] if args else args, kwargs

    def _attn_post(self, module, args, output):
        if self.run is None or not self.run.skip:
            return None
        self.run.skip = False
        return (torch.zeros_like(output[0]), *output[1:])  # the attention already ran in the layer's pre-hook

    def _bias(self, hidden: Tensor) -> Optional[Tensor]:
        size = self.run.size
        if size is None:
            return None
        return size.log()[:, None, None, :, 0].to(hidden.dtype)  # (B, 1, 1, t): proportional attention

    def _layer_hook(self, number: int):
        def hook(module, args, kwargs):
            run = self.run
            if run is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, t, D)
            bias = self._bias(hidden)
            r = run.schedule[number] if number < len(run.schedule) else 0
            if r == 0:
                if bias is None:
                    return None
                return _with_input(args, kwargs, hidden, bias)
            attention = module.self_attn
            run.inner = True
            try:
                attended = attention(hidden_states=module.layer_norm1(hidden), attention_mask=bias)[0]  # (B, t, D)
            finally:
                run.inner = False
            merged, size, slots, done = tower_merge_step(
                hidden + attended, run.keys, attention.num_heads, r, run.size, run.slots, class_token=True
            )  # (B, t - done, D), (B, t - done, 1), (B, T0)
            if done:
                run.size, run.slots = size, slots
            run.done.append(done)
            run.skip = True
            return _with_input(args, kwargs, merged, None)

        return hook

    def _pad(self, module, args, output):
        """Projector output (crops, k, D) back to the placeholder count (crops, N, D): padded with zeros
        (``"first"`` layout) or each patch given its merged token's value (``"sources"``)."""
        if self.last is None or output.dim() != 3 or output.shape[1] >= self.patches:
            return None
        if self.layout == "sources":
            self.last.projected = output
            slots = self.last.slots[:, 1:] - 1  # (crops, N): patch -> merged patch token (CLS slot 0 removed)
            rows = torch.arange(output.shape[0], device=output.device)[:, None]  # (crops, 1)
            return output[rows, slots]  # (crops, N, D)
        pad = output.new_zeros(output.shape[0], self.patches - output.shape[1], output.shape[2])
        return torch.cat([output, pad], dim=1)


def _with_input(args: tuple, kwargs: dict, hidden: Tensor, mask: Optional[Tensor]) -> tuple[tuple, dict]:
    """A layer's (args, kwargs) with its hidden states and attention mask replaced (CLIP calls
    ``layer(hidden_states, attention_mask, **kwargs)``)."""
    if args:
        return (hidden, mask, *args[2:]), {k: v for k, v in kwargs.items() if k != "attention_mask"}
    return args, {**kwargs, "hidden_states": hidden, "attention_mask": mask}


def apply_tower_merge(plan: Any, drop: Any, layer: int, budgets: list, state: DropState) -> Decision:
    """The ``vision_layers`` drop of a `Plan`: keep each image's first ``k`` placeholder slots (the merged tokens the
    tower produced), drop the rest, and record sizes and the assignment of every patch to its slot."""
    videos = sum(getattr(layout, "kind", "image") == "video" for layout in plan.layouts)
    if videos:
        raise ValueError(
            f"placement vision_layers merges inside {plan.adapter.name}'s image tower only: this forward has {videos} "
            "video row(s); use placement vision / pre_llm / layer for videos"
        )
    merge = plan.context.tower_merge
    if isinstance(merge, TowerFlowCut):
        return apply_tower_flowcut(plan, drop, layer, budgets, state)
    run = merge.take() if merge is not None else None
    if run is None:
        raise RuntimeError("placement vision_layers: the vision tower did not run with its merging hooks")
    if merge.layout == "sources":
        return apply_sources(plan, drop, layer, budgets, state, run)
    columns, slots = plan._rows(state)
    images = plan.num_images
    if run.slots is None:  # nothing merged (the budget keeps every patch)
        kept = merge.patches
        all_slots = torch.arange(kept + 1).expand(images, -1)  # (R, T0)
        all_sizes = torch.ones(images, kept + 1)  # (R, T0)
    else:
        kept = int(run.size.shape[1]) - 1  # patches after merging (CLS removed by the select strategy)
        all_slots, all_sizes = run.slots.cpu(), run.size[..., 0].float().cpu()
    if all_slots.shape[0] != images:
        raise ValueError(f"vision_layers: {all_slots.shape[0]} encoded images for {images} images")
    keep = torch.ones_like(state.valid)
    for r in range(plan.num_images):
        keep[plan.image_sample[r], slots[r][kept:]] = False
    record = Selection(
        indices=torch.arange(kept).expand(images, -1).clone(),
        mask=torch.ones(images, kept, dtype=torch.bool),
        critical=torch.zeros(images, kept, dtype=torch.bool),
        sizes=all_sizes[:, 1:].round().long(),
        assignment=all_slots[:, 1:] - 1,  # (R, N): patch -> slot among the patches (CLS slot 0 removed)
    )
    before = torch.tensor([c.numel() for c in columns], dtype=torch.long)
    plan.records.append(DropRecord(drop.where, layer, tuple(budgets), record, before))
    return Decision(keep=keep, values=None, replace=None)


def tower_merge_for(adapter: Any, pipeline: Any, drops: Any, budget_of: Callable[[], Any]) -> Optional[Any]:
    """The tower hooks of a pipeline whose placement drops at ``vision_layers`` (None otherwise): FlowCut's
    (`adapters.tower_flowcut.TowerFlowCut`) when the relevance stage is ``flowcut`` (diversity ``none``, placement
    ``r = 0``; its ``count`` picks each image's own prune count or the batch's shared one), else ToMe's `TowerMerge`, whose merge rule needs diversity ``tome_merge``. The budget (one for every
    image of a forward: the tower runs its images as one batch) resolves to the patches kept per image."""
    if not any(d.where == "vision_layers" for d in drops):
        return None
    relevance = getattr(getattr(pipeline, "relevance", None), "name", None)
    diversity = getattr(getattr(pipeline, "diversity", None), "name", None)
    if relevance == "flowcut":
        if diversity != "none" or int(getattr(pipeline.placement, "r", 0)) != 0:
            raise ValueError(
                f"placement vision_layers with relevance.flowcut prunes by FlowCut's own schedule: use diversity.none "
                f"and placement.vision_layers without r (got diversity {diversity!r}, r="
                f"{getattr(pipeline.placement, 'r', 0)}), e.g. the preset 'flowcut'"
            )
    elif diversity != "tome_merge":
        raise ValueError(
            f"placement vision_layers merges inside the vision tower with ToMe (diversity.tome_merge) or prunes with "
            f"FlowCut (relevance.flowcut): got relevance {relevance!r}, diversity {diversity!r}; e.g. the preset "
            "'tome' or 'flowcut'"
        )
    allocator = pipeline.budget

    def keep_of(patches: int) -> int:
        budget = budget_of()
        if isinstance(budget, tuple):
            if len(set(budget)) != 1:
                raise ValueError(
                    f"placement vision_layers merges a forward's images as one batch: give one budget for every image, "
                    f"got {list(budget)}"
                )
            budget = budget[0]
        return int(allocator.resolve(budget, torch.tensor([patches]))[0])

    if relevance == "flowcut":
        return TowerFlowCut(adapter, keep_of, shared=pipeline.relevance.count == "batch")
    return TowerMerge(adapter, int(getattr(pipeline.placement, "r", 0)), keep_of)
