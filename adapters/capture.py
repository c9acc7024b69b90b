"""Vision-side capture: what the vision hooks saw during the last vision-tower run (`VisionCapture`), and the
two ways of capturing it an adapter description can choose (``VLMAdapter.vision_hooks``):

- `ProjectorCapture` (LLaVA family): the projector's input / output, the CLS attention row and keys of the
  feature layer, the CLS hidden state (VisionZip ``keep_cls``).
- `TowerRunCapture` (Qwen-VL): one `VisionRun` per tower call (images and videos run separately), the patch
  merger's input grouped into merge units and put back in the LLM's token order.

``generate`` runs the tower before the forward (``get_image_features``), so a capture is not tied to a forward
call; the runtime takes it when the forward's drop plan is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch
from torch import Tensor, nn

from .call import ForwardCall

__all__ = [
    "VisionCapture",
    "CaptureNeeds",
    "VisionHooks",
    "ProjectorCapture",
    "TowerRunCapture",
    "VisionRun",
    "clip_cls_rows",
    "clip_full_width_cls_rows",
    "group_merge_units",
]

#: Most recent vision-tower runs a `TowerRunCapture` keeps for the next prefill (an image and a video run per
#: forward, with room for ``generate``'s pre-encoding).
KEPT_RUNS = 8


@dataclass
class VisionCapture:
    """What the vision hooks saw during the last vision-tower run (``generate`` runs the tower before the
    forward, through ``get_image_features``, so this is not tied to a forward call).

    Attributes:
        cls: (crops, Hv, n_all) fp32 CLS attention rows (CLS column included).
        keys: (crops, n_all, Hv, dv) key states of the CLS layer.
        features: (crops, n, Dv) projector input (vision features after the CLS strategy).
        projected: (crops, n, D) projector output.
    """

    cls: Optional[Tensor] = None
    keys: Optional[Tensor] = None
    features: Optional[Tensor] = None
    projected: Optional[Tensor] = None
    cls_token: Optional[Tensor] = None  # (crops, Dv) CLS hidden state of the selected feature layer (keep_cls)
    runs: list = field(default_factory=list)  # adapter-specific records of several tower runs (Qwen: VisionRun)


@dataclass(frozen=True)
class CaptureNeeds:
    """What the pipeline needs from the vision tower.

    Attributes:
        cls: the CLS attention row of the feature layer (``cls_attention``; ``visual_keys`` at ``vision``).
        keys: also the key states of that layer (``visual_keys``).
        cls_token: the CLS hidden state of the feature layer (VisionZip ``keep_cls=True``).
        full_width: the CLS row and keys of the layer AFTER the feature layer, as one head over the full width
            (hint ``full_width_cls_attention``, PruMerge: :func:`clip_full_width_cls_rows`).
    """

    cls: bool = False
    keys: bool = False
    cls_token: bool = False
    full_width: bool = False


class VisionHooks(Protocol):
    """A vision capture strategy: installs its hooks on one adapter's modules and hands out what it saw."""

    def install(self, adapter: Any, needs: CaptureNeeds, projecting: Callable[[], bool]) -> list:
        """Register the hooks (``projecting()`` is True while the runtime itself runs the projector); return
        their removable handles."""

    def take(self) -> VisionCapture:
        """What the last tower run(s) left, emptied."""


def clip_cls_rows(layer: nn.Module, hidden: Tensor, want_keys: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """CLS-token attention row of a CLIP-style encoder layer (``layer_norm1``, ``self_attn.{q,k}_proj``,
    ``self_attn.scale``), recomputed from the layer input so it works under sdpa.

    Returns ``(attention (C, H, n) fp32, keys (C, n, H, d) or None)`` over all n tokens (CLS included).
    """
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden)
    crops, length, _ = normed.shape
    head_dim = attn.head_dim
    query = attn.q_proj(normed[:, :1]).view(crops, 1, -1, head_dim).transpose(1, 2)
    key = attn.k_proj(normed).view(crops, length, -1, head_dim).transpose(1, 2)
    scale = getattr(attn, "scale", None) or getattr(attn, "scaling")
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)[:, :, 0]
    return probs, (key.transpose(1, 2) if want_keys else None)


def clip_full_width_cls_rows(layer: nn.Module, hidden: Tensor, want_keys: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """PruMerge's CLS row (github.com/42Shawn/LLaVA-PruMerge @ 097c0411, ``clip_encoder.py``: hooks on
    ``layers[23].self_attn.{q,k}_proj``): ``softmax(q k^T * D ** -0.5)`` over the full width (ONE head, D = the
    hidden size, unscaled ``q_proj`` / ``k_proj`` outputs on ``layer_norm1(hidden)``), in the model dtype as the
    official code, the whole matrix then its CLS row.

    Returns ``(attention (C, 1, n) fp32, keys (C, n, 1, D) or None)`` over all n tokens (CLS included).
    """
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden)  # (C, n, D)
    query = attn.q_proj(normed)  # (C, n, D)
    key = attn.k_proj(normed)  # (C, n, D)
    scores = (query @ key.transpose(-2, -1)) * hidden.shape[-1] ** -0.5  # (C, n, n)
    probs = torch.softmax(scores, dim=-1)[:, :1].float()  # (C, 1, n)
    return probs, (key.unsqueeze(2) if want_keys else None)


def following_layer(adapter: Any, layer: nn.Module) -> nn.Module:
    """The tower layer after ``layer`` (the one reading the selected features: PruMerge's ``layers[23]``)."""
    layers = list(adapter.tower.encoder.layers)
    number = next(i for i, candidate in enumerate(layers) if candidate is layer)
    if number + 1 >= len(layers):
        raise ValueError(
            f"{type(adapter.tower).__name__}: the feature layer is the tower's last layer, so there is no following "
            "layer to take the full-width CLS attention from (PruMerge reads the layer after the feature layer)"
        )
    return layers[number + 1]


class ProjectorCapture:
    """LLaVA-family capture: a pre-hook on ``vision_entry`` opens a capture, the projector's hooks record its input
    and output, the feature layer's hooks the CLS row / keys / CLS hidden state (``adapter.cls_layer``)."""

    def __init__(self) -> None:
        self._vision: Optional[VisionCapture] = None
        self._projecting: Callable[[], bool] = lambda: False
        self._want_keys = False
        self._rows: Callable[..., tuple[Tensor, Optional[Tensor]]] = clip_cls_rows

    def install(self, adapter: Any, needs: CaptureNeeds, projecting: Callable[[], bool]) -> list:
        self._projecting = projecting
        self._want_keys = needs.keys
        self._rows = clip_full_width_cls_rows if needs.full_width else clip_cls_rows
        layer = None
        if needs.cls or needs.cls_token:
            layer = adapter.cls_layer(ForwardCall.empty())  # raises before any hook when the tower has no CLS token
        scoring = following_layer(adapter, layer) if layer is not None and needs.full_width and needs.cls else layer
        handles = [
            adapter.vision_entry.register_forward_pre_hook(self._tower_hook, with_kwargs=True),
            adapter.projector.register_forward_pre_hook(self._projector_pre),
            adapter.projector.register_forward_hook(self._projector_post),
        ]
        if layer is not None:
            if needs.cls:
                handles.append(scoring.register_forward_pre_hook(self._cls_hook, with_kwargs=True))
            if needs.cls_token:
                handles.append(layer.register_forward_hook(self._cls_token_hook))
        return handles

    def take(self) -> VisionCapture:
        capture, self._vision = self._vision, None
        return capture if capture is not None else VisionCapture()

    def _tower_hook(self, module, args, kwargs):
        if not self._projecting():
            self._vision = VisionCapture()
        return None

    def _cls_hook(self, module, args, kwargs):
        if self._vision is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        self._vision.cls, self._vision.keys = self._rows(module, hidden, want_keys=self._want_keys)
        return None

    def _cls_token_hook(self, module, args, output):
        if self._vision is not None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            self._vision.cls_token = hidden[:, 0]
        return None

    def _projector_pre(self, module, args):
        if self._vision is not None and not self._projecting() and args:
            self._vision.features = args[0]
        return None

    def _projector_post(self, module, args, output):
        if self._vision is not None and not self._projecting():
            self._vision.projected = output
        return None


def group_merge_units(features: Tensor, merge_size: int) -> Tensor:
    """Merger input (patches, Dv) -> one row per LLM token (patches / m^2, m^2 * Dv): the processor
    orders patches so that each run of ``m * m`` consecutive patches is one merged token.

    >>> group_merge_units(torch.arange(8.0).view(8, 1), 2).tolist()
    [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]
    """
    unit = merge_size * merge_size
    patches, dim = features.shape
    if patches % unit:
        raise ValueError(f"{patches} patches do not form whole {merge_size}x{merge_size} merge units")
    return features.reshape(patches // unit, unit * dim)  # (tokens, m*m*Dv)


@dataclass
class VisionRun:
    """One run of the Qwen vision tower: the images (or the videos) of one forward.

    Attributes:
        grid_thw: (items, 3) patch grids the tower was given.
        features: (tokens, m*m*Dv) merger input, one row per LLM token, in the LLM's token order.
    """

    grid_thw: Tensor
    features: Tensor
    _pending: dict = field(default_factory=dict, repr=False)


class TowerRunCapture:
    """Qwen-VL capture: one `VisionRun` per tower call (``grid_thw`` from the call, the merger's input grouped
    into merge units, window order undone with ``adapter.window_order`` and checked against the tower output).

    Args:
        merge_size: the merger input has ``merge_size ** 2`` consecutive rows per LLM token (default: the adapter's
            ``merge_size``; 1 for a tower that merges before its merger, e.g. GLM-4.1V's downsampling conv).
    """

    def __init__(self, merge_size: Optional[int] = None) -> None:
        self._merge_size = merge_size
        self._runs: list[VisionRun] = []
        self._run: Optional[VisionRun] = None
        self._projecting: Callable[[], bool] = lambda: False
        self._adapter: Any = None

    def install(self, adapter: Any, needs: CaptureNeeds, projecting: Callable[[], bool]) -> list:
        self._adapter, self._projecting = adapter, projecting
        return [
            adapter.vision_entry.register_forward_pre_hook(self._tower_hook, with_kwargs=True),
            adapter.projector.register_forward_pre_hook(self._projector_pre),
            adapter.projector.register_forward_hook(self._projector_post),
            adapter.vision_entry.register_forward_hook(self._tower_done, with_kwargs=True),
        ]

    def take(self) -> VisionCapture:
        runs, self._runs = self._runs, []
        return VisionCapture(runs=runs)

    def _tower_hook(self, module, args, kwargs):
        if self._projecting():
            return None
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is None:
            raise ValueError(f"{self._adapter.name}: the vision tower was called without grid_thw")
        self._run = VisionRun(grid_thw=grid, features=torch.empty(0))
        return None

    def _projector_pre(self, module, args):
        if self._run is not None and not self._projecting() and args:
            self._run._pending["input"] = args[0]
        return None

    def _projector_post(self, module, args, output):
        if self._run is not None and not self._projecting():
            self._run._pending["merged"] = output
        return None

    def _tower_done(self, module, args, kwargs, output):
        run, self._run = self._run, None
        if run is None or "input" not in run._pending:
            return None
        adapter = self._adapter
        merged = run._pending.pop("merged")  # (tokens, D) in the tower's internal order
        merge = adapter.merge_size if self._merge_size is None else self._merge_size
        units = group_merge_units(run._pending.pop("input"), merge)  # (tokens, m*m*Dv)
        order = adapter.window_order(run.grid_thw)
        if order is not None:
            units, merged = units[order.to(units.device)], merged[order.to(merged.device)]
        pooled = getattr(output, "pooler_output", None)
        if pooled is not None and not torch.equal(merged, pooled):
            raise RuntimeError(
                f"{adapter.name}: the captured merger rows do not match the tower's output order; the vision "
                "placement cannot align vision features with LLM tokens for this transformers version"
            )
        run.features = units.detach()
        self._runs = (self._runs + [run])[-KEPT_RUNS:]
        return None
