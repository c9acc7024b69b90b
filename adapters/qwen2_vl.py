"""Adapter for Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``): dynamic resolution, M-RoPE, images and videos.

It is a `VLMAdapter` on the shared runtime (``adapters.base``) and decoder machinery
(``adapters.decoder``). What is Qwen-specific lives here:

- **Visual spans** (`find_visual_segments`): every run of ``config.image_token_id`` /
  ``config.video_token_id`` placeholders is cut into consecutive images / videos of
  ``t * (h / m) * (w / m)`` tokens (the merged patches the LLM sees), taking the rows of
  ``image_grid_thw`` / ``video_grid_thw`` in batch order (``m = vision_config.spatial_merge_size``).
  One `Signals` row per image or per video (the budget is per image / per video).
- **Prompt span** (`prompt_span`): the user's text, without vision tokens or the system prefix.
- **Positions** (M-RoPE): the decoder stack is always given ``(4, B, L)`` position ids, the
  1-D text positions (``cumsum(attention_mask) - 1``, as ``generate`` builds them) on top of the
  three M-RoPE rows. ``"keep"``: kept tokens keep their three M-RoPE ids. ``"compact"``: kept
  tokens are numbered ``0 .. K-1`` on all three axes (text position minus the tokens dropped before
  it), the positions the model gives a K-token sequence fed as embeddings; the images' 2-D layout is
  discarded. `continuation_positions` maps a decoding step onto the pruned cache.
- **Vision placement**: selection on the vision tower's output before the patch merger (the
  projector). The unit is the LLM token: the ``m * m`` patches the merger fuses into one token,
  their features concatenated (``Signals.visual`` is (R, N, m*m*Dv), the merger's input rows).
  Every tower run (the images of a forward, then its videos) is captured with its ``grid_thw``;
  Qwen2.5-VL's window-attention order is undone (`window_order`) and the result is checked
  against the tower's own output at run time. Merged values go back through the merger
  (`QwenVLAdapter.project`).
- **Not provided**: ``cls_attention`` and ``visual_keys`` at ``vision`` (the tower has no CLS
  token); asking for them fails at attach time with the model and placement named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence

import torch
from torch import Tensor, nn


from .base import EMBEDDING_SIGNALS, LAYER_SIGNALS, VISION_SIGNALS, Attachment, ImageLayout, VisionCapture, VLMAdapter, _Call, _Plan
from .decoder import DecoderSpec

__all__ = [
    "QwenVLAdapter",
    "VisualSegment",
    "find_visual_segments",
    "llm_grids",
    "refine_grid",
    "prompt_span",
    "text_positions",
    "with_text_row",
    "compact_positions",
    "continuation_positions",
    "VisionRun",
    "group_merge_units",
]

#: Most recent vision-tower runs kept for the next prefill (an image run and a video run per forward).
_KEPT_RUNS = 8

# ------------------------------------------------------------------------------------------------
# Pure functions: spans and prompt (no model)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisualSegment:
    """One image or video as the language model sees it.

    Attributes:
        sample: batch row of the model input.
        kind: "image" or "video".
        start: sequence position of its first placeholder token.
        grid: (t, h, w) in language-model tokens (after the spatial merge); tokens are in
            (t, h, w) row-major order.
    """

    sample: int
    kind: str
    start: int
    grid: tuple[int, int, int]

    @property
    def length(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def stop(self) -> int:
        return self.start + self.length


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """(start, length) of each run of consecutive integers in the sorted ``positions``."""
    runs: list[tuple[int, int]] = []
    for position in positions:
        if runs and runs[-1][0] + runs[-1][1] == position:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((position, 1))
    return runs


def find_visual_segments(
    input_ids: Tensor,
    image_grids: Sequence[tuple[int, int, int]],
    video_grids: Sequence[tuple[int, int, int]],
    *,
    image_token_id: int,
    video_token_id: int,
) -> tuple[VisualSegment, ...]:
    """Locate every image and video in ``input_ids`` (B, L).

    ``image_grids`` / ``video_grids`` are the (t, h, w) of each item in language-model tokens (after
    the spatial merge), in batch order, as the model consumes them (see `llm_grids`). Raises
    ``ValueError`` when placeholders and grids disagree.

    >>> ids = torch.tensor([[5, 9, 9, 9, 6]])
    >>> find_visual_segments(ids, [(1, 1, 2), (1, 1, 1)], [], image_token_id=9, video_token_id=8)[1]
    VisualSegment(sample=0, kind='image', start=3, grid=(1, 1, 1))
    """
    segments: list[VisualSegment] = []
    items = (("image", image_token_id, list(image_grids)), ("video", video_token_id, list(video_grids)))
    for kind, token_id, queue in items:
        used = 0
        for sample in range(input_ids.shape[0]):
            positions = (input_ids[sample] == token_id).nonzero().flatten().tolist()
            for start, length in _runs(positions):
                offset = 0
                while offset < length:
                    if used == len(queue):
                        raise ValueError(
                            f"row {sample} has more {kind} placeholder tokens (id {token_id}) than the "
                            f"{len(queue)} {kind}s given cover"
                        )
                    segment = VisualSegment(sample, kind, start + offset, tuple(queue[used]))
                    if offset + segment.length > length:
                        raise ValueError(
                            f"{kind} {used} has grid {segment.grid} ({segment.length} tokens) but row {sample} "
                            f"has a run of {length - offset} placeholder tokens at position {start + offset}"
                        )
                    segments.append(segment)
                    offset += segment.length
                    used += 1
        if used != len(queue):
            raise ValueError(f"{len(queue)} {kind}s were given but the placeholders cover only {used}")
    return tuple(sorted(segments, key=lambda s: (s.sample, s.start)))


def llm_grids(
    grid_thw: Optional[Tensor], encoded: Any, merge_size: int
) -> list[tuple[int, int, int]]:
    """(t, h, w) in language-model tokens of each image (or video) of a forward.

    From the processor's ``*_grid_thw`` (patches) when the call has it; otherwise from the tower
    outputs that ``generate`` precomputes (``mm_encoder_outputs[modality].pooler_output``, one
    (n, D) tensor per item), which give the token count only: (1, 1, n) until `refine_grid`.
    """
    if grid_thw is not None:
        return [(int(t), int(h) // merge_size, int(w) // merge_size) for t, h, w in grid_thw.tolist()]
    if encoded is not None:
        return [(1, 1, int(item.shape[0])) for item in encoded.pooler_output]
    return []


def refine_grid(segment: VisualSegment, position_ids: Tensor) -> VisualSegment:
    """The segment's (t, h, w) read back from its M-RoPE ids ((3, B, L) or (4, B, L); distinct
    temporal ids, height and width extents); unchanged when they do not factor its length."""
    rows = position_ids[-3:, segment.sample, segment.start : segment.stop]  # (3, n)
    t = int(rows[0].unique().numel())
    h = int(rows[1].max() - rows[1].min()) + 1
    w = int(rows[2].max() - rows[2].min()) + 1
    if t * h * w != segment.length:
        return segment
    return VisualSegment(segment.sample, segment.kind, segment.start, (t, h, w))


def prompt_span(
    input_ids: Tensor,
    real: Tensor,
    segments: Sequence[VisualSegment],
    *,
    vision_token_ids: frozenset[int],
    end_token_ids: frozenset[int],
    prompt_stop: Optional[Sequence[int]] = None,
) -> tuple[list[Tensor], Tensor]:
    """The prompt span of every sample and its scoring query token.

    The user's text is the real tokens from the sample's first visual placeholder up to the end of
    the user turn, without vision tokens (placeholders, ``<|vision_start|>``, ``<|vision_end|>``)
    and without end-of-turn tokens. The turn ends at the first occurrence of ``prompt_stop`` (a
    token-id sequence) after the last placeholder when it is given; otherwise at the last
    end-of-turn token (``end_token_ids``: the text and generation configs' EOS ids, which are
    ``<|im_end|>`` for the chat models) after the last placeholder, or at the end of the input.
    In the chat template this leaves out the system prefix, the ``<|im_start|>user`` header and
    the generation prompt; text between two images of the turn is included. A sample whose span
    is empty uses all its real non-vision tokens. The query token (whose attention row scores the
    visual tokens at layer drops) is the last prompt token, or the last real token.

    Args:
        input_ids: (B, L) long.
        real: (B, L) bool, False at padding.
    Returns: (list of (T_b,) long positions per sample, (B,) long query positions).

    >>> ids = torch.tensor([[7, 1, 3, 9, 9, 4, 20, 21, 1, 2]])  # sys <end> <vs> img img <ve> q q <end> gen
    >>> segment = VisualSegment(0, "image", 3, (1, 1, 2))
    >>> spans, query = prompt_span(ids, ids > 0, [segment], vision_token_ids=frozenset({3, 4, 9}),
    ...                            end_token_ids=frozenset({1}))
    >>> spans[0].tolist(), query.tolist()
    ([6, 7], [7])
    """
    batch, length = input_ids.shape
    device = input_ids.device
    arange = torch.arange(length, device=device)
    vision = torch.isin(input_ids, torch.tensor(sorted(vision_token_ids), device=device))  # (B, L)
    ends = torch.isin(input_ids, torch.tensor(sorted(end_token_ids) or [-1], device=device))  # (B, L)
    spans, queries = [], []
    for row in range(batch):
        text = real[row] & ~vision[row] & ~ends[row]  # (L,)
        own = [s for s in segments if s.sample == row]
        span = text
        if own:
            first, last = min(s.start for s in own), max(s.stop for s in own)
            stop = length
            if prompt_stop:
                found = _find(input_ids[row], list(prompt_stop), last)
                stop = found if found >= 0 else length
            else:
                later = (ends[row] & (arange >= last)).nonzero().flatten()
                stop = int(later[-1]) if later.numel() else length
            inside = text & (arange >= first) & (arange < stop)
            span = inside if bool(inside.any()) else text
        positions = span.nonzero().flatten()
        spans.append(positions)
        reals = real[row].nonzero().flatten()
        fallback = reals[-1] if reals.numel() else torch.tensor(length - 1, device=device)
        queries.append(positions[-1] if positions.numel() else fallback)
    return spans, torch.stack(queries).long()


def _find(row: Tensor, pattern: list[int], start: int) -> int:
    """First index >= start where ``pattern`` occurs in ``row`` (1-D), or -1."""
    values = row.tolist()
    for i in range(start, len(values) - len(pattern) + 1):
        if values[i : i + len(pattern)] == pattern:
            return i
    return -1


# ------------------------------------------------------------------------------------------------
# M-RoPE positions
# ------------------------------------------------------------------------------------------------


def text_positions(mask2d: Tensor) -> Tensor:
    """(B, L) 1-D text positions of a fresh sequence: ``cumsum(mask) - 1``, 0 at padding (what
    ``generate`` puts in the first row of its 4-row position ids).

    >>> text_positions(torch.tensor([[False, True, True], [True, True, True]])).tolist()
    [[0, 0, 1], [0, 1, 2]]
    """
    return (mask2d.long().cumsum(dim=1) - 1).masked_fill(~mask2d.bool(), 0)


def with_text_row(position_ids: Optional[Tensor], mask2d: Tensor) -> Tensor:
    """Stack-level (4, B, L) position ids of a prefill: text positions, then the three M-RoPE rows.

    Args:
        position_ids: (3, B, L) or (4, B, L) (returned unchanged), (B, L), or None (the text model's
            default: ``arange(L)`` on the three axes).
        mask2d: (B, L) bool.
    """
    if position_ids is not None and position_ids.dim() == 3 and position_ids.shape[0] == 4:
        return position_ids
    text = text_positions(mask2d)  # (B, L)
    if position_ids is None:
        batch, length = mask2d.shape
        position_ids = torch.arange(length, device=mask2d.device).expand(3, batch, length)
    elif position_ids.dim() == 2:
        position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
    position_ids = position_ids.expand(3, text.shape[0], -1)
    return torch.cat([text.unsqueeze(0).to(position_ids.dtype), position_ids], dim=0)  # (4, B, L)


def compact_positions(position_ids: Tensor, delta: Tensor) -> Tensor:
    """``compact`` renumbering: every row becomes the text position minus ``delta``.

    Args:
        position_ids: (4, B, S) stack-level ids (text row first).
        delta: (B, S) or (B, 1) tokens dropped before each slot.
    Returns: (4, B, S): ``0 .. K-1`` over the kept tokens of a prefill, ``K + n`` for the n-th later token.

    >>> ids = torch.tensor([[[0, 3, 4]], [[0, 2, 4]], [[0, 1, 4]], [[0, 1, 4]]])  # (4, 1, 3)
    >>> compact_positions(ids, torch.tensor([[0, 2, 2]]))[:, 0].tolist()
    [[0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1, 2]]
    """
    if position_ids.shape[0] != 4:
        raise ValueError(f"compact positions need the (4, B, S) stack-level ids, got {tuple(position_ids.shape)}")
    text = position_ids[0] - delta.to(position_ids.dtype)  # (B, S)
    return text.unsqueeze(0).expand(4, -1, -1).contiguous()


def continuation_positions(original: Tensor, mask2d: Optional[Tensor], seen: int, new: int) -> Tensor:
    """Stack-level (4, B, new) ids, in the unpruned sequence's coordinates, of ``new`` tokens that
    follow a prompt whose prefill had ids ``original`` (4, B, L) and ``seen`` later tokens.

    ``mask2d`` (B, L + seen + new) is the attention mask in unpruned coordinates (what ``generate``
    keeps), or None (no padding). The M-RoPE rows are text position + rope delta, the delta being
    ``max M-RoPE id + 1 - real prompt tokens`` (``Qwen2VLModel.get_rope_index``'s ``rope_deltas``).
    """
    text_prefill, mrope_prefill = original[0], original[1:]  # (B, L), (3, B, L)
    real = text_prefill.amax(dim=1) + 1  # (B,)
    delta = mrope_prefill.amax(dim=(0, 2)) + 1 - real  # (B,)
    if mask2d is not None:
        text = (mask2d.long().cumsum(dim=1) - 1)[:, -new:]  # (B, new)
    else:
        text = real.unsqueeze(1) + seen + torch.arange(new, device=original.device)  # (B, new)
    text = text.to(original.dtype)
    mrope = (text + delta.unsqueeze(1)).unsqueeze(0).expand(3, -1, -1)  # (3, B, new)
    return torch.cat([text.unsqueeze(0), mrope], dim=0)  # (4, B, new)


# ------------------------------------------------------------------------------------------------
# The adapter
# ------------------------------------------------------------------------------------------------


def _text_row(position_ids: Tensor) -> Optional[Tensor]:
    """The ``position_ids`` the decoder layers receive: the text row of (4, B, L) ids, else None (what
    ``Qwen2VLTextModel`` passes)."""
    return position_ids[0] if position_ids.dim() == 3 and position_ids.shape[0] == 4 else None


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


def _token_ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, (list, tuple, set, frozenset)):
        return {int(v) for v in value}
    return {int(value)}


class QwenVLAdapter(VLMAdapter):
    """Qwen2-VL / Qwen2.5-VL: ViT with 2-D RoPE and a patch merger, M-RoPE Qwen2 decoder."""

    name: ClassVar[str] = "qwen2_vl"
    description: ClassVar[str] = (
        "Qwen2-VL / Qwen2.5-VL (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration): "
        "dynamic resolution, M-RoPE, images and videos"
    )
    model_classes: ClassVar[tuple[str, ...]] = (
        "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2VLModel",
        "Qwen2_5_VLModel",
    )
    placements: ClassVar[frozenset[str]] = frozenset({"vision", "pre_llm", "layer", "schedule"})
    has_grid: ClassVar[bool] = True
    pixel_kwargs: ClassVar[tuple[str, ...]] = ("pixel_values", "pixel_values_videos")
    limitations: ClassVar[dict[str, str]] = {
        "cls_attention": "the Qwen vision tower has no CLS token",
        "visual_keys": "at vision: the Qwen vision tower has no CLS layer to take keys from",
        "pre_llm_clip": "Qwen's tower is not a CLIP model: no CLIP text space",
    }

    @classmethod
    def provides(cls, placement: str) -> frozenset[str]:
        """Signals filled at ``placement``; never ``cls_attention`` (the tower has no CLS token)."""
        if placement == "vision":
            return VISION_SIGNALS | {"grid", "grids"}
        if placement == "pre_llm":
            return EMBEDDING_SIGNALS | {"grid", "grids"}
        if placement in ("layer", "schedule"):
            return EMBEDDING_SIGNALS | LAYER_SIGNALS | {"grid", "grids"}
        raise ValueError(f"{cls.name} adapter: unknown placement {placement!r}; supported: {sorted(cls.placements)}")

    def __init__(self, model: nn.Module):
        self.model = model
        self.vlm = model.model if hasattr(model, "model") and hasattr(model.model, "language_model") else model
        self.config = self.vlm.config
        self.stack = self.vlm.language_model
        self.tower = self.vlm.visual
        self.vision_entry = self.tower
        self.projector = self.tower.merger
        self.merge_size = int(self.config.vision_config.spatial_merge_size)
        self.video_token_id = int(self.config.video_token_id)
        self.vision_token_ids = frozenset(
            {
                self.image_token_id,
                self.video_token_id,
                int(self.config.vision_start_token_id),
                int(self.config.vision_end_token_id),
            }
        )
        generation = getattr(model, "generation_config", None)
        self.end_token_ids = frozenset(
            _token_ids(self.config.text_config.eos_token_id) | _token_ids(getattr(generation, "eos_token_id", None))
        )

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        return (self.image_token_id, self.video_token_id)

    def decoder_spec(self) -> DecoderSpec:
        """Llama-like stack driven with (4, B, L) position ids (text row + M-RoPE rows)."""
        stack = self.stack

        def default_positions(embeds: Tensor, past: int) -> Tensor:
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
            return with_text_row(None, mask) + past  # (4, B, L)

        return DecoderSpec.for_llama_like(
            stack,
            rope=lambda hidden, positions: stack.rotary_emb(hidden, positions[-3:]),
            layer_position_ids=_text_row,
            shift_positions=compact_positions,
            default_positions=default_positions,
        )

    @property
    def vision_width(self) -> int:
        """Dv, the patch merger's per-patch width (a merge unit has m*m*Dv features)."""
        return int(self.projector.ln_q.weight.shape[0])

    def project(self, values: Tensor) -> Tensor:
        """Merge units (..., n, m*m*Dv) -> LLM tokens (..., n, D) through the patch merger (``projector``)."""
        dim, width = self.vision_width, self.vision_width * self.merge_size**2
        if values.shape[-1] != width:
            raise ValueError(f"{self.name}: merge units have {values.shape[-1]} features, the merger takes {width}")
        lead = values.shape[:-1]
        dtype = next(self.projector.parameters()).dtype
        out = self.projector(values.reshape(-1, dim).to(dtype))  # (prod(lead), D)
        return out.view(*lead, out.shape[-1])

    def window_order(self, grid_thw: Tensor) -> Optional[Tensor]:
        """Permutation ``p`` with ``natural = window_ordered[p]`` for a tower with window attention
        (Qwen2.5-VL permutes merge units into windows before its blocks and undoes it after the
        merger); None for a tower without (Qwen2-VL)."""
        window = getattr(self.tower, "window_size", None)
        if window is None:
            return None
        if hasattr(self.tower, "get_window_index"):  # transformers 4.x
            index, _ = self.tower.get_window_index(grid_thw)
        else:
            from transformers.vision_utils import get_vision_window_index

            index, _ = get_vision_window_index(grid_thw, self.merge_size, int(window), int(self.tower.patch_size))
        return torch.argsort(torch.as_tensor(index, device=grid_thw.device))

    def cls_layer(self, call: _Call) -> nn.Module:
        raise ValueError(
            f"{type(self.model).__name__}: the Qwen vision tower has no CLS token, so cls_attention is not "
            "available at any placement (vision, pre_llm, layer, schedule); use a relevance stage that reads "
            "the prompt or the LLM attention instead"
        )

    def segments(self, call: _Call) -> tuple[VisualSegment, ...]:
        """The images and videos of the forward in flight, in sequence order (`find_visual_segments`)."""
        kwargs = call.kwargs
        encoded = kwargs.get("mm_encoder_outputs") or {}
        images = llm_grids(kwargs.get("image_grid_thw"), encoded.get("image"), self.merge_size)
        videos = llm_grids(kwargs.get("video_grid_thw"), encoded.get("video"), self.merge_size)
        segments = find_visual_segments(
            call.input_ids, images, videos, image_token_id=self.image_token_id, video_token_id=self.video_token_id
        )
        positions = kwargs.get("position_ids")
        if positions is not None and positions.dim() == 3 and positions.shape[0] in (3, 4):
            segments = tuple(refine_grid(s, positions) if s.grid[:2] == (1, 1) else s for s in segments)
        return segments

    def image_counts(self, call: _Call, num_image_tokens: int) -> list[int]:
        counts = [segment.length for segment in self.segments(call)]
        if sum(counts) != num_image_tokens:
            raise ValueError(f"{self.name}: the grids cover {sum(counts)} of the {num_image_tokens} visual tokens")
        return counts

    def layouts(self, call: _Call, counts: list[int], token_embeds: list[Tensor]) -> list[ImageLayout]:
        """One layout per image / video; ``grid`` = (h, w) merged tokens for images (t = 1)."""
        layouts = []
        for segment in self.segments(call):
            t, h, w = segment.grid
            layouts.append(ImageLayout(segment.length, None, (h, w) if t == 1 else None, kind=segment.kind))
        return layouts

    def vision_rows(self, capture: Any, layouts: Any, token_embeds: Any, per_crop: Tensor) -> list[Tensor]:
        raise NotImplementedError(f"{self.name}: vision rows come from the captured tower runs (QwenPlan)")


class QwenAttachment(Attachment):
    """`Attachment` with the Qwen specifics: image + video placeholders, the Qwen prompt span, (4, B, L)
    stack positions (added by a stack pre-hook that runs before the decoder machinery's)."""

    adapter: QwenVLAdapter

    def __init__(self, adapter: QwenVLAdapter, pipeline: Any, budget: Any, *, positions: str, prompt_stop=None, **options):
        self._runs: list[VisionRun] = []
        self._run: Optional[VisionRun] = None
        super().__init__(adapter, pipeline, budget, positions=positions, prompt_stop=prompt_stop, **options)
        self._handles.append(
            adapter.stack.register_forward_pre_hook(self._stack_positions, with_kwargs=True, prepend=True)
        )

    def _install(self, adapter: VLMAdapter, probe: Sequence[Any]) -> None:
        super()._install(adapter, probe)
        if self._need_vision:
            self._handles.append(adapter.vision_entry.register_forward_hook(self._tower_done, with_kwargs=True))

    # -- vision-tower hooks: one `VisionRun` per tower call (images and videos run separately) ----------

    def _tower_hook(self, module, args, kwargs):
        if self._projecting:
            return None
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is None:
            raise ValueError(f"{self.adapter.name}: the vision tower was called without grid_thw")
        self._run = VisionRun(grid_thw=grid, features=torch.empty(0))
        return None

    def _projector_pre(self, module, args):
        if self._run is not None and not self._projecting and args:
            self._run._pending["input"] = args[0]
        return None

    def _projector_post(self, module, args, output):
        if self._run is not None and not self._projecting:
            self._run._pending["merged"] = output
        return None

    def _tower_done(self, module, args, kwargs, output):
        run, self._run = self._run, None
        if run is None or "input" not in run._pending:
            return None
        merged = run._pending.pop("merged")  # (tokens, D) in the tower's internal order
        units = group_merge_units(run._pending.pop("input"), self.adapter.merge_size)  # (tokens, m*m*Dv)
        order = self.adapter.window_order(run.grid_thw)
        if order is not None:
            units, merged = units[order.to(units.device)], merged[order.to(merged.device)]
        pooled = getattr(output, "pooler_output", None)
        if pooled is not None and not torch.equal(merged, pooled):
            raise RuntimeError(
                f"{self.adapter.name}: the captured merger rows do not match the tower's output order; the vision "
                "placement cannot align vision features with LLM tokens for this transformers version"
            )
        run.features = units.detach()
        self._runs = (self._runs + [run])[-_KEPT_RUNS:]
        return None

    def _take_vision(self) -> VisionCapture:
        runs, self._runs = self._runs, []
        return VisionCapture(runs=runs)

    # -- hooks ------------------------------------------------------------------------------------------

    def _placeholders(self, module, bound: dict) -> Optional[Tensor]:
        """From ``input_ids`` only (the items are cut by their ids and grids, see ``segments``): a prefill whose
        visual input comes with ``inputs_embeds`` raises."""
        if bound.get("input_ids") is None:
            past = bound.get("cache", bound.get("past_key_values"))
            if past is None or past.get_seq_length() == 0:
                raise ValueError(
                    f"{self.adapter.name}: images and videos are located by their placeholder ids; call the model "
                    "with input_ids (not inputs_embeds) while it is pruned"
                )
            return None
        return super()._placeholders(module, bound)

    def _stack_positions(self, module, args, kwargs):
        """Give the stack (4, B, L) positions: at a pruned prefill, and at every continuation of a pruned
        cache (in the unpruned coordinates, which the decoder machinery then maps onto the cache)."""
        embeds = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        if embeds is None or (mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 2)):
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        positions = kwargs.get("position_ids")
        if cache is not None and cache.get_seq_length() > 0:
            session = self.decoder.sessions.get(cache)
            if session is None or (positions is not None and positions.dim() == 3 and positions.shape[0] == 4):
                return None  # not pruned, or `generate`'s own (4, B, n) ids in unpruned coordinates
            first = session.segments[0]
            seen = cache.get_seq_length(first.start) - first.length
            kwargs = dict(kwargs)
            kwargs["position_ids"] = continuation_positions(session.original_positions, mask, seen, embeds.shape[1])
            return args, kwargs
        call = self._current()
        if call is None or not call.has_images:
            return None
        if mask is None:
            mask2d = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        else:
            mask2d = mask.bool()
        kwargs = dict(kwargs)
        kwargs["position_ids"] = with_text_row(positions, mask2d)
        return args, kwargs


class QwenPlan(_Plan):
    """`_Plan` with the Qwen prompt span (`prompt_span`)."""

    def __init__(self, owner: QwenAttachment, call: _Call, embeds: Tensor, image_mask: Tensor, mask2d: Tensor):
        super().__init__(owner, call, embeds, image_mask, mask2d)
        adapter = owner.adapter
        self.prompts, query = prompt_span(
            call.input_ids.to(embeds.device),
            mask2d,
            adapter.segments(call),
            vision_token_ids=adapter.vision_token_ids,
            end_token_ids=adapter.end_token_ids,
            prompt_stop=owner.prompt_stop,
        )
        self.query = query.to(self.device)

    def _vision_feature_rows(self) -> list[Tensor]:
        """Per image / video, its merge units (num_tokens, m*m*Dv) from the captured tower runs: the run
        of each kind is the latest one whose ``grid_thw`` equals the forward's (or, when the forward does
        not carry it, whose token count matches)."""
        segments = self.adapter.segments(self.call)
        rows: dict[int, Tensor] = {}
        for kind in ("image", "video"):
            numbers = [n for n, s in enumerate(segments) if s.kind == kind]
            if not numbers:
                continue
            sizes = [segments[n].length for n in numbers]
            grid = self.call.kwargs.get(f"{kind}_grid_thw")
            candidates = [
                run for run in self.capture.runs
                if run.features.shape[0] == sum(sizes)
                and (grid is None or torch.equal(run.grid_thw.cpu(), grid.cpu()))
            ]
            if not candidates:
                raise RuntimeError(
                    f"vision placement: no vision-tower run of this forward's {len(numbers)} {kind}(s) was captured"
                )
            for n, part in zip(numbers, candidates[-1].features.split(sizes)):
                rows[n] = part.to(self.device)
        return [rows[n] for n in range(len(segments))]


QwenAttachment.plan_class = QwenPlan
QwenVLAdapter.attachment_class = QwenAttachment
