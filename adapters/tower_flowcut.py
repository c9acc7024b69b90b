"""FlowCut inside a CLIP-style vision tower (``relevance.flowcut`` at placement ``vision_layers``), with removable
hooks on one model instance.

Official FlowCut (github.com/TungChintao/FlowCut @ a2ecd247, ``flowcut/modeling_clip_flowcut.py``
``CLIPEncoderLayer_forward`` / ``CLIPEncoder_forward``) prunes at the *end* of an encoder layer (after its MLP),
scoring with that layer's own attention: the layer's output is what gets cut, so no hook inside the layer is needed:

* forward hooks on ``q_proj`` / ``k_proj`` / ``v_proj`` of every layer before the feature layer keep the layer's
  projections (the attention itself runs untouched);
* a forward hook on each such layer computes the FlowCut terms from them (`functional.flowcut`), blends the running
  score and, at the layers whose ``rpl`` is even (the layer just before the feature layer always among them: it
  prunes to the target), returns the pruned output: the CLS token and each row's kept patches in ascending position
  order;
* each row keeps its own count, so rows may be ragged between pruning layers: the padded batch then runs the next
  layers with an additive attention mask that hides the padding (a forward pre-hook on the layer), and the layer
  before the feature layer leaves every row exactly at the target (no padding reaches the feature layer); with
  ``relevance.flowcut(count=batch)`` every row prunes the batch's shared count instead (official ``r.max(0)``), so
  rows stay equal-length and no padding arises.

The target counts the CLS token (official ``target``): budget ``k`` (visual tokens handed to the LLM, CLS removed by
the select strategy) is ``target = k + 1``. A budget covering every patch changes nothing (no layer's output holds
more than the target, as officially). The tower's ``k`` patches go through the projector, which is padded back to the
image's placeholder count with zeros; `apply_tower_flowcut` keeps each image's first ``k`` placeholder slots (the
kept patches, in ascending position order) and drops the rest at the decoder input, as ToMe's ``"first"`` layout.
A feature layer with no layer before it (``vision_feature_layer`` reading layer 0's output, where the official
``rpl`` never reaches 0) is an extension of ours: layer 0 scores, and the forced step cuts the feature layer's own
patches at the projector input. Only that layout (LLaVA-1.5) is supported: the official AnyRes path (LLaVA-NeXT) halves the target per crop and prunes
again inside the LLM, which is not reproduced here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from vtprune.framework.selection import Selection
from vtprune.strategies.functional.flowcut import flowcut_keep, flowcut_layer_step, flowcut_remaining

from .decoder import Decision, DropState
from .records import DropRecord

__all__ = ["TowerFlowCut", "FlowCutRun", "apply_tower_flowcut"]


@dataclass
class FlowCutRun:
    """One FlowCut tower run.

    Attributes:
        target: tokens the feature layer receives (CLS counted).
        running: (B, n) running score of the present patches (None before the first scoring layer).
        positions: (B, n) long, the original patch index (0-based, CLS excluded) of every current patch slot.
        present: (B, 1 + n) bool, the real tokens of each row (CLS first), or None when no row is padded.
        projections: the current layer's ``q_proj`` / ``k_proj`` / ``v_proj`` outputs, (B, t, D) each.
        kept: patches kept per pruning layer, one (B,) long per step (for inspection).
        done: the feature-layer-0 step has cut the projector input (that case only).
    """

    target: int
    running: Optional[Tensor] = None
    positions: Optional[Tensor] = None
    present: Optional[Tensor] = None
    projections: dict = field(default_factory=dict)
    kept: list = field(default_factory=list)
    done: bool = False


class TowerFlowCut:
    """FlowCut hooks on one adapter's CLIP-style vision tower (``encoder.layers[i]`` with ``self_attn``
    (``q_proj``, ``k_proj``, ``v_proj``, ``num_heads``, ``scale``), a CLS token at position 0).

    Args:
        adapter: the adapter description instance (``tower``, ``vision_entry``, ``projector``, ``config``,
            ``tower_layout`` must be ``"first"``).
        keep_of: returns the patches to keep of an image with ``n`` patches (the resolved budget).
        shared: every image of a tower batch prunes the batch's count (stage parameter ``count='batch'``, the
            official ``r.max(0)``); False: each image its own count.
    """

    def __init__(self, adapter: Any, keep_of: Callable[[int], int], shared: bool = False):
        tower = adapter.tower
        if getattr(getattr(tower, "embeddings", None), "class_embedding", None) is None:
            raise ValueError(f"{type(tower).__name__} has no CLS token: FlowCut needs a CLIP-style tower")
        layer = adapter.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError("FlowCut in the tower needs a single vision_feature_layer (got a list)")
        if adapter.config.vision_feature_select_strategy != "default":
            raise ValueError("FlowCut in the tower needs vision_feature_select_strategy='default' (CLS removed)")
        layout = getattr(adapter, "tower_layout", "first")
        if layout != "first":
            raise ValueError(
                f"FlowCut in the tower is implemented for LLaVA-1.5-style towers (one image per tower input); "
                f"{adapter.name} packs crops itself (tower layout {layout!r}): use another preset there"
            )
        self.adapter = adapter
        self.layers = list(tower.encoder.layers)
        self.feature = len(self.layers) + layer if layer < 0 else layer - 1  # the layer whose output is read
        if not 0 <= self.feature < len(self.layers):
            raise ValueError(
                f"FlowCut scores with an encoder layer's attention: vision_feature_layer={layer} of a "
                f"{len(self.layers)}-layer tower reads no layer's output"
            )
        self.keep_of = keep_of
        self.shared = shared
        self.layout = layout
        side = adapter.patch_side()
        self.patches = side * side
        self.run: Optional[FlowCutRun] = None
        self.last: Optional[FlowCutRun] = None

    def install(self) -> list:
        handles = [self.adapter.vision_entry.register_forward_pre_hook(self._start)]
        for number, layer in enumerate(self.layers[: max(self.feature, 1)]):  # feature layer 0: it scores itself
            attention = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj"):
                handles.append(getattr(attention, name).register_forward_hook(self._keep_projection(name)))
            handles.append(layer.register_forward_pre_hook(self._mask_padding, with_kwargs=True))
            handles.append(layer.register_forward_hook(self._layer_hook(number)))
        if self.feature == 0:
            handles.append(self.adapter.projector.register_forward_pre_hook(self._prune_features))
        handles.append(self.adapter.projector.register_forward_hook(self._pad))
        return handles

    def take(self) -> Optional[FlowCutRun]:
        """The last finished tower run (None when the tower has not run while attached)."""
        return self.last

    # -- hooks ------------------------------------------------------------------------------------------------

    def _start(self, module, args):
        keep = int(self.keep_of(self.patches))
        if keep < 1:
            raise ValueError(f"FlowCut keeps at least one patch per image (the budget resolves to {keep})")
        self.run = FlowCutRun(target=keep + 1)
        self.last = self.run
        return None

    def _keep_projection(self, name: str):
        def hook(module, args, output):
            if self.run is not None:
                self.run.projections[name] = output  # (B, t, D)
            return None

        return hook

    def _mask_padding(self, module, args, kwargs):
        run = self.run
        if run is None or run.present is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, t, D)
        hide = torch.finfo(hidden.dtype).min
        mask = torch.zeros(run.present.shape, dtype=hidden.dtype, device=hidden.device)  # (B, t)
        mask = mask.masked_fill(~run.present, hide)[:, None, None, :].expand(-1, 1, hidden.shape[1], -1)  # (B, 1, t, t)
        if args:
            return (hidden, mask, *args[2:]), {k: v for k, v in kwargs.items() if k != "attention_mask"}
        return args, {**kwargs, "attention_mask": mask}

    def _layer_hook(self, number: int):
        remaining = flowcut_remaining(self.feature, number)

        def hook(module, args, output):
            run = self.run
            if run is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output  # (B, t, D)
            if hidden.shape[1] <= run.target:
                return None
            pruned = self._step(module, hidden, remaining)
            if pruned is None:
                return None
            return (pruned, *output[1:]) if isinstance(output, tuple) else pruned

        return hook

    def _step(self, layer: Any, hidden: Tensor, remaining: int) -> Optional[Tensor]:
        """`functional.flowcut.flowcut_layer_step` on the layer's output ``hidden`` (B, t, D) and kept projections;
        the pruned output, or None when the layer only scores."""
        run = self.run
        attention = layer.self_attn
        if run.positions is None:
            run.positions = torch.arange(hidden.shape[1] - 1, device=hidden.device).expand(hidden.shape[0], -1)  # (B, n)
        p, run.projections = run.projections, {}  # used once: not kept alive past this layer
        out, run.running, run.positions, run.present, kept = flowcut_layer_step(
            hidden, p["q_proj"], p["k_proj"], p["v_proj"], attention.num_heads, attention.scale,
            run.running, run.positions, run.present, remaining, run.target, self.shared,
        )  # (B, 1 + k, D)
        if kept is None:
            return None
        run.kept.append(kept)
        return out

    def _prune_features(self, module, args):
        """Feature layer 0 (no layer before it to prune at): the forced step on the projector input (images, n, Dv),
        the feature layer's own patches, ranked by that layer's score."""
        run = self.run
        if run is None or run.running is None or run.done:
            return None
        features = args[0]  # (B, n, Dv)
        valid = torch.ones(run.running.shape, dtype=torch.bool, device=run.running.device)  # (B, n)
        index, kept = flowcut_keep(run.running, valid, valid.sum(dim=1), run.target - 1)  # (B, k)
        rows = torch.arange(index.shape[0], device=index.device)[:, None]  # (B, 1)
        run.positions, run.running, run.done = run.positions[rows, index], run.running[rows, index], True
        run.kept.append(kept.sum(dim=1))
        return (features[rows, index.to(features.device)], *args[1:])  # (B, k, Dv)

    def _pad(self, module, args, output):
        """Projector output (images, k, D) back to the placeholder count (images, N, D), padded with zeros."""
        if self.last is None or output.dim() != 3 or output.shape[1] >= self.patches:
            return None
        pad = output.new_zeros(output.shape[0], self.patches - output.shape[1], output.shape[2])
        return torch.cat([output, pad], dim=1)


def apply_tower_flowcut(plan: Any, drop: Any, layer: int, budgets: list, state: DropState) -> Decision:
    """The ``vision_layers`` drop of a `Plan` under FlowCut: keep each image's first ``k`` placeholder slots (its kept
    patches, ascending), drop the rest, and record which patch each slot holds (``assignment``: patch -> slot,
    -1 for a pruned patch)."""
    videos = sum(getattr(layout, "kind", "image") == "video" for layout in plan.layouts)
    if videos:
        raise ValueError(
            f"FlowCut prunes inside {plan.adapter.name}'s image tower only: this forward has {videos} video row(s)"
        )
    run = plan.context.tower_merge.take()
    if run is None:
        raise RuntimeError("FlowCut: the vision tower did not run with its pruning hooks")
    images = plan.num_images
    patches = plan.context.tower_merge.patches
    positions = run.positions if run.positions is not None else torch.arange(patches).expand(images, -1)
    positions = positions.cpu()  # (R, k)
    if positions.shape[0] != images:
        raise ValueError(f"FlowCut: {positions.shape[0]} encoded images for {images} images")
    kept = positions.shape[1]
    columns, slots = plan._rows(state)
    keep = torch.ones_like(state.valid)
    for r in range(images):
        keep[plan.image_sample[r], slots[r][kept:]] = False
    assignment = torch.full((images, patches), -1, dtype=torch.long)  # (R, N)
    assignment.scatter_(1, positions, torch.arange(kept).expand(images, -1).clone())
    record = Selection(
        indices=torch.arange(kept).expand(images, -1).clone(),
        mask=torch.ones(images, kept, dtype=torch.bool),
        critical=torch.ones(images, kept, dtype=torch.bool),
        sizes=torch.ones(images, kept, dtype=torch.long),
        assignment=assignment,
    )
    before = torch.tensor([c.numel() for c in columns], dtype=torch.long)
    plan.records.append(DropRecord(drop.where, layer, tuple(budgets), record, before))
    return Decision(keep=keep, values=None, replace=None)
