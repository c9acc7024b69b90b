"""`Signals`: everything a pruning point can see, batch-first.

Field names are public API: stages declare the fields they need by name (``Stage.requires``) and
adapters fill them. Only ``visual`` is always present; every other field is ``None`` unless the
placement and the adapter provide it (see ``vtprune.framework.placements`` and docs/adapters.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional

import torch
from torch import Tensor

__all__ = [
    "ALWAYS_PRESENT",
    "CLIP_SIGNALS",
    "CLS_SIGNALS",
    "DROP_SIGNALS",
    "EMBEDDING_SIGNALS",
    "GRID_SIGNALS",
    "INPUT_SIGNALS",
    "LAYER_SIGNALS",
    "VIDEO_SIGNALS",
    "VIEW_SIGNALS",
    "PLACEMENT_SIGNALS",
    "SIGNAL_DESCRIPTIONS",
    "Signals",
    "VISION_SIGNALS",
    "signal_names",
]

#: One line per field: what it holds and its shape. Used by the catalog and by error messages.
SIGNAL_DESCRIPTIONS: dict[str, str] = {
    "visual": "(B, N, D) visual tokens in the space where pruning happens (post-projector "
    "embeddings before the LLM, hidden states inside it, vision-encoder outputs at `vision`)",
    "visual_mask": "(B, N) bool, True = real token; None = all real (padding is never selected)",
    "prompt": "(B, T, D) the prompt's text tokens in the same space as `visual`",
    "prompt_mask": "(B, T) bool, True = real prompt token; None = all real",
    "attention": "(B, H, N) softmax attention of the last prompt token to each visual token at "
    "the scoring layer",
    "prompt_attention": "(B, H, T, N) softmax attention of every prompt token (rows as in `prompt`) to each "
    "visual token at the scoring layer (SparseVLM's text raters read their rows)",
    "visual_keys": "(B, N, Hk, dk) key states of the visual tokens per key head at the scoring layer",
    "prompt_keys": "(B, T, Hk, dk) key states of the prompt tokens per key head at the scoring layer",
    "clip_visual": "(B, N, C) CLIP-space patch embeddings",
    "clip_text": "(B, M, C) CLIP-space text embeddings of the prompt",
    "clip_text_mask": "(B, M) bool, True = real CLIP text token; None = all real",
    "cls_attention": "(B, H, N) the vision encoder's CLS-to-patch attention",
    "grid": "(h, w) the patch grid shape shared by every row, row-major token order",
    "grids": "(B, 2) long per-row (h, w) patch grids, (0, 0) = no grid for that row; set instead of `grid` "
    "when rows differ (images of different sizes)",
    "frames": "(B, 3) long per-row (T, H, W) frame structure of a video row: its frame-grid tokens are the "
    "T*H*W tokens with `frame_index` >= 0, frame-major (frame t, then row-major h, w); (0, 0, 0) = not a video row",
    "frame_index": "(B, N) long, the frame of each visual token; -1 for tokens outside the frame grids "
    "(newline / separator tokens, image rows, padding)",
    "frame_span": "(B, N, 2) long, the first and last frame of the original frame tokens each visual token stands for "
    "(itself, or what earlier drops of the same forward merged into it); (-1, -1) for tokens that stand for no frame "
    "token (newline / separator tokens, image rows, padding)",
    "input_visual": "(B, M, D) the decoder input embeddings of every token of each row's image, before any drop "
    "(M >= the N tokens left at a later drop; padded rows: `input_visual_mask`) (SparseVLM's text raters)",
    "input_visual_mask": "(B, M) bool, True = real token of `input_visual`; None = all real",
    "input_prompt": "(B, T, D) the decoder input embeddings of the prompt tokens (rows and mask as in `prompt`)",
    "view_index": "(B, N) long, the view of its image each visual token comes from (LLaVA-NeXT / LLaVA-OneVision AnyRes: "
    "0 = the base image, 1 = the high-resolution crops; a one-view image or a video: 0 everywhere); -1 for tokens of no view (image-newline "
    "tokens) and padding; None = every row is one view (G-Prune builds one graph per view)",
    "visual_attention": "(B, H, N, N) softmax attention of every visual token (rows, dim 2) to each visual token "
    "(dim 3) at the scoring layer (FitPrune's self-attention term)",
}


# -- signal-name sets: the one place that says which signals exist where -------------------------

#: Signals every pruning point provides.
ALWAYS_PRESENT: frozenset[str] = frozenset({"visual", "visual_mask"})
#: Vision-encoder output (drop kind ``vision``), before any prompt is seen.
VISION_SIGNALS: frozenset[str] = ALWAYS_PRESENT
#: Embedding-space points (``pre_llm``, and the inputs of an in-LLM drop): visual and prompt tokens.
EMBEDDING_SIGNALS: frozenset[str] = ALWAYS_PRESENT | {"prompt", "prompt_mask"}
#: What the scoring layer of an in-LLM drop adds.
LAYER_SIGNALS: frozenset[str] = frozenset(
    {"attention", "prompt_attention", "visual_attention", "visual_keys", "prompt_keys"}
)
#: The vision encoder's CLS attention (adapters of CLIP-style encoders provide it everywhere).
CLS_SIGNALS: frozenset[str] = frozenset({"cls_attention"})
#: CLIP-space embeddings (placement ``pre_llm_clip``).
CLIP_SIGNALS: frozenset[str] = frozenset({"clip_visual", "clip_text", "clip_text_mask"})
#: The patch grid, shared (``grid``) or per row (``grids``).
GRID_SIGNALS: frozenset[str] = frozenset({"grid", "grids"})
#: The frame structure of video rows (adapters that take videos provide both wherever they provide a grid).
VIDEO_SIGNALS: frozenset[str] = frozenset({"frames", "frame_index", "frame_span"})
#: The views of an image whose tokens come from several views (AnyRes: base image and high-resolution crops).
VIEW_SIGNALS: frozenset[str] = frozenset({"view_index"})
#: The decoder input embeddings of the image and prompt tokens, at in-LLM drops on request (adapter hint
#: ``input_embeddings``, docs/adapters.md): what the sequence looked like before layer 0 and before any drop.
INPUT_SIGNALS: frozenset[str] = frozenset({"input_visual", "input_visual_mask", "input_prompt"})

#: Drop kind (`Drop.where`) -> the signals every adapter gives there (adapters may add more).
DROP_SIGNALS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "vision": VISION_SIGNALS,
        "pre_llm": EMBEDDING_SIGNALS,
        "layer": EMBEDDING_SIGNALS | LAYER_SIGNALS,
        # inside the vision tower, progressively across its layers (ToMe); the tower's own tokens only
        "vision_layers": VISION_SIGNALS,
    }
)
#: Built-in placement name -> its ``LayerPlacement.provides`` (what any adapter implementing it gives).
PLACEMENT_SIGNALS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "pre_llm": EMBEDDING_SIGNALS | {"grid"} | VIDEO_SIGNALS,
        "pre_llm_clip": EMBEDDING_SIGNALS | {"grid"} | CLIP_SIGNALS,
        "layer": EMBEDDING_SIGNALS | {"grid"} | LAYER_SIGNALS | VIDEO_SIGNALS,
        "schedule": EMBEDDING_SIGNALS | {"grid"} | LAYER_SIGNALS | VIDEO_SIGNALS,
        "vision": VISION_SIGNALS | CLS_SIGNALS | {"visual_keys", "grid"},
        "vision_layers": VISION_SIGNALS,
    }
)


@dataclass(frozen=True)
class Signals:
    """What a pruning point can see about one batch of images (one image per row).

    Every tensor is batch-first. Rows may be ragged: ``visual_mask`` marks the real tokens of each
    row and padding is never selected. Stages must treat each row independently (no statistic may
    couple two rows), so a row gives the same selection alone as inside any batch.
    """

    visual: Tensor  # (B, N, D)
    visual_mask: Optional[Tensor] = None  # (B, N) bool
    prompt: Optional[Tensor] = None  # (B, T, D)
    prompt_mask: Optional[Tensor] = None  # (B, T) bool
    attention: Optional[Tensor] = None  # (B, H, N)
    visual_keys: Optional[Tensor] = None  # (B, N, Hk, dk)
    prompt_keys: Optional[Tensor] = None  # (B, T, Hk, dk)
    clip_visual: Optional[Tensor] = None  # (B, N, C)
    clip_text: Optional[Tensor] = None  # (B, M, C)
    clip_text_mask: Optional[Tensor] = None  # (B, M) bool
    cls_attention: Optional[Tensor] = None  # (B, H, N)
    grid: Optional[tuple[int, int]] = field(default=None)
    grids: Optional[Tensor] = None  # (B, 2) long
    frames: Optional[Tensor] = None  # (B, 3) long (T, H, W)
    frame_index: Optional[Tensor] = None  # (B, N) long, -1 = outside the frame grids
    prompt_attention: Optional[Tensor] = None  # (B, H, T, N)
    frame_span: Optional[Tensor] = None  # (B, N, 2) long, (-1, -1) = no frame
    input_visual: Optional[Tensor] = None  # (B, M, D)
    input_visual_mask: Optional[Tensor] = None  # (B, M) bool
    input_prompt: Optional[Tensor] = None  # (B, T, D)
    visual_attention: Optional[Tensor] = None  # (B, H, N, N)
    view_index: Optional[Tensor] = None  # (B, N) long, -1 = no view (newlines, padding)

    def __post_init__(self) -> None:
        if not isinstance(self.visual, Tensor) or self.visual.dim() != 3:
            shape = tuple(self.visual.shape) if isinstance(self.visual, Tensor) else type(self.visual)
            raise ValueError(f"Signals.visual must be a (B, N, D) tensor, got {shape}")
        batch, tokens = self.visual.shape[:2]
        per_token = {
            "visual_mask": 2,
            "attention": 3,
            "visual_keys": 4,
            "clip_visual": 3,
            "cls_attention": 3,
            "prompt_attention": 4,
            "visual_attention": 4,
        }
        for name, ndim in per_token.items():
            value = getattr(self, name)
            if value is None:
                continue
            token_axis = 1 if name in ("visual_mask", "visual_keys", "clip_visual") else (3 if name == "prompt_attention" else 2)
            square = name != "visual_attention" or value.shape[-1] == tokens  # rows and columns both visual
            if value.dim() != ndim or value.shape[0] != batch or value.shape[token_axis] != tokens or not square:
                raise ValueError(
                    f"Signals.{name} has shape {tuple(value.shape)}; expected "
                    f"{SIGNAL_DESCRIPTIONS[name].split(' ', 1)[0].replace('N', str(tokens)).replace('B', str(batch))}"
                )
        if self.visual_mask is not None and self.visual_mask.dtype != torch.bool:
            raise ValueError("Signals.visual_mask must be a bool tensor (True = real token)")
        if self.prompt is not None and (self.prompt.dim() != 3 or self.prompt.shape[0] != batch):
            raise ValueError(f"Signals.prompt must be (B={batch}, T, D), got {tuple(self.prompt.shape)}")
        if self.prompt_attention is not None and self.prompt is not None and self.prompt_attention.shape[2] != self.prompt.shape[1]:
            raise ValueError(
                f"Signals.prompt_attention has {self.prompt_attention.shape[2]} prompt rows but Signals.prompt has "
                f"T={self.prompt.shape[1]} tokens: one attention row per prompt token"
            )
        if self.prompt is not None and self.prompt.shape[-1] != self.visual.shape[-1]:
            raise ValueError(
                f"Signals.prompt has width D={self.prompt.shape[-1]} but Signals.visual has D={self.visual.shape[-1]}: "
                "the prompt tokens must be in the same space as the visual tokens"
            )
        if self.grid is not None and self.visual_mask is None and self.grid[0] * self.grid[1] != tokens:
            raise ValueError(f"Signals.grid {self.grid} does not cover the N={tokens} visual tokens")
        if self.grids is not None:
            if self.grids.dim() != 2 or tuple(self.grids.shape) != (batch, 2) or self.grids.is_floating_point():
                raise ValueError(f"Signals.grids must be a (B={batch}, 2) integer tensor, got {tuple(self.grids.shape)}")
            area = self.grids.prod(-1)  # (B,)
            if bool((area > tokens).any()):
                raise ValueError(f"Signals.grids {self.grids.tolist()} has a grid larger than the N={tokens} visual tokens")
        self._check_frames(batch, tokens)
        if self.view_index is not None and (
            tuple(self.view_index.shape) != (batch, tokens) or self.view_index.is_floating_point()
            or bool((self.view_index < -1).any())
        ):
            raise ValueError(
                f"Signals.view_index must be a (B={batch}, N={tokens}) integer tensor of views >= 0 or -1 (no view), "
                f"got {tuple(self.view_index.shape)} {self.view_index.dtype}"
            )
        self._check_frame_span(batch, tokens)
        self._check_inputs(batch)

    def _check_inputs(self, batch: int) -> None:
        """``input_visual`` (B, M, D) with ``input_visual_mask`` (B, M) bool (only with ``input_visual``);
        ``input_prompt`` shaped as ``prompt``; both in the width D of ``visual``."""
        width = self.visual.shape[-1]
        if self.input_visual_mask is not None and self.input_visual is None:
            raise ValueError("Signals.input_visual_mask is set without Signals.input_visual")
        if self.input_visual is not None:
            value = self.input_visual
            if value.dim() != 3 or value.shape[0] != batch or value.shape[-1] != width:
                raise ValueError(f"Signals.input_visual must be (B={batch}, M, D={width}), got {tuple(value.shape)}")
            mask = self.input_visual_mask
            if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != tuple(value.shape[:2])):
                raise ValueError(
                    f"Signals.input_visual_mask must be a (B, M) = {tuple(value.shape[:2])} bool tensor, "
                    f"got {tuple(mask.shape)} {mask.dtype}"
                )
        if self.input_prompt is not None:
            value = self.input_prompt
            expected = (batch, self.prompt.shape[1], width) if self.prompt is not None else None
            if value.dim() != 3 or value.shape[0] != batch or value.shape[-1] != width or (
                expected is not None and tuple(value.shape) != expected
            ):
                raise ValueError(
                    f"Signals.input_prompt must be shaped as Signals.prompt (B={batch}, T, D={width}), "
                    f"got {tuple(value.shape)}"
                )

    def _check_frames(self, batch: int, tokens: int) -> None:
        """``frames`` and ``frame_index`` come together; each video row's frame tokens number T*H*W, and the
        frame index never decreases along the row (frame-major order)."""
        if (self.frames is None) != (self.frame_index is None):
            raise ValueError("Signals.frames and Signals.frame_index must be set together (or neither)")
        if self.frames is None:
            return
        if self.frames.dim() != 2 or tuple(self.frames.shape) != (batch, 3) or self.frames.is_floating_point():
            raise ValueError(f"Signals.frames must be a (B={batch}, 3) integer tensor (T, H, W), got {tuple(self.frames.shape)}")
        index = self.frame_index
        if index.dim() != 2 or tuple(index.shape) != (batch, tokens) or index.is_floating_point():
            raise ValueError(f"Signals.frame_index must be a (B={batch}, N={tokens}) integer tensor, got {tuple(index.shape)}")
        counts = (index >= 0).sum(-1)  # (B,)
        volume = self.frames.prod(-1)  # (B,)
        if not torch.equal(counts.cpu(), volume.cpu()):
            raise ValueError(
                f"Signals.frames {self.frames.tolist()} (T*H*W = {volume.tolist()}) disagree with frame_index, "
                f"which marks {counts.tolist()} frame tokens per row"
            )
        frame_tokens = torch.where(index >= 0, index, torch.full_like(index, -1)).cummax(-1).values  # (B, N)
        if bool(((index >= 0) & (index != frame_tokens)).any()) or bool((index >= self.frames[:, :1]).any()):
            raise ValueError("Signals.frame_index must be frame-major: non-decreasing along each row and < T")

    def _check_frame_span(self, batch: int, tokens: int) -> None:
        """``frame_span`` (B, N, 2) integer: each token's (first, last) frame with ``0 <= first <= last``, or (-1, -1)."""
        span = self.frame_span
        if span is None:
            return
        if span.dim() != 3 or tuple(span.shape) != (batch, tokens, 2) or span.is_floating_point():
            raise ValueError(f"Signals.frame_span must be a (B={batch}, N={tokens}, 2) integer tensor, got {tuple(span.shape)}")
        first, last = span[..., 0], span[..., 1]  # (B, N)
        none = (first == -1) & (last == -1)  # (B, N)
        if bool((~none & ((first < 0) | (last < first))).any()):
            raise ValueError("Signals.frame_span must hold (first, last) frames with 0 <= first <= last, or (-1, -1)")

    @property
    def batch_size(self) -> int:
        return int(self.visual.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.visual.shape[1])

    def valid(self) -> Tensor:
        """(B, N) bool: the real visual tokens (all True when ``visual_mask`` is None)."""
        if self.visual_mask is not None:
            return self.visual_mask
        return torch.ones(self.visual.shape[:2], dtype=torch.bool, device=self.visual.device)

    def row_grids(self) -> list[Optional[tuple[int, int]]]:
        """Per row, its (h, w) patch grid or None: ``grids`` when set (rows with (0, 0) have none), else
        ``grid`` for every row. Stages that use the grid read it through this, so a row sees the same grid
        alone (``grid``) as inside a batch of differently sized images (``grids``)."""
        if self.grids is not None:
            return [(int(h), int(w)) if int(h) * int(w) > 0 else None for h, w in self.grids.tolist()]
        return [self.grid] * self.batch_size

    def row_frames(self) -> list[Optional[tuple[int, int, int]]]:
        """Per row, its (T, H, W) frame structure, or None for rows that are not videos (or no ``frames``)."""
        if self.frames is None:
            return [None] * self.batch_size
        return [(int(t), int(h), int(w)) if int(t) * int(h) * int(w) > 0 else None for t, h, w in self.frames.tolist()]

    def row_views(self, row: int, valid: Tensor) -> list[Tensor]:
        """Row ``row``'s views: one (n_v,) long tensor of positions per view present, in view order, among the
        ``valid`` ((B, N) bool) tokens; without ``view_index`` the row is one view of all its ``valid`` tokens. Valid
        tokens of no view (``view_index`` -1: newlines) are in none of them."""
        real = valid[row]  # (N,)
        if self.view_index is None:
            return [torch.nonzero(real, as_tuple=False).flatten()]
        index = torch.where(real, self.view_index[row], torch.full_like(self.view_index[row], -1))  # (N,)
        return [torch.nonzero(index == v, as_tuple=False).flatten() for v in torch.unique(index[index >= 0]).tolist()]

    def present(self) -> frozenset[str]:
        """Names of the fields that are set (not None)."""
        return frozenset(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    def row(self, index: int) -> "Signals":
        """The signals of one row as a batch of one (for per-sample references and tests)."""
        values = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            values[f.name] = value[index : index + 1] if isinstance(value, Tensor) else value
        return Signals(**values)


def signal_names() -> tuple[str, ...]:
    """Every public `Signals` field name, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(Signals))
