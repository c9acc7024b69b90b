"""Adapter for Qwen3-VL (``Qwen3VLForConditionalGeneration``, ``Qwen3VLModel``): dynamic resolution,
interleaved M-RoPE, images, videos with frame timestamps, and DeepStack.

It is the Qwen2-VL description (``adapters.qwen2_vl``: prompt span, ``(4, B, L)`` stack positions, ``keep`` /
``compact``, rope deltas when decoding, the ``vision`` capture before the patch merger) with what differs
overridden; the DeepStack hooks are in ``adapters.deepstack`` (re-exported here). What is Qwen3-specific:

- **DeepStack** (`DeepstackHooks`, `DeepstackFeed` in ``adapters.deepstack``): the features the text model adds
  to the visual tokens after its first layers follow the kept tokens; a keep-all forward is bit-identical.
- **Visual items** (`find_visual_items`): a Qwen3-VL video is written frame by frame, each frame its own run of
  ``h * w`` placeholders between ``<|vision_start|>`` / ``<|vision_end|>`` and preceded by a timestamp
  (``<0.5 seconds>``). One `Signals` row per image and per *video* (all its frames); the timestamps are not part
  of the prompt span. M-RoPE positions and decoding are the Qwen2 adapter's (the text model's rotary module
  interleaves the three axes itself; its ``rope_deltas`` are ``max id + 1 - prompt length`` as in Qwen2-VL).
- **Vision placement**: as Qwen2-VL (merge units before the main patch merger; the DeepStack mergers are not
  selection inputs); the kept tokens keep their own DeepStack features.
- **Not provided**: ``cls_attention`` (no CLS token) and ``visual_keys`` at ``vision``.

>>> sorted(Qwen3VLAdapter.placements)
['layer', 'pre_llm', 'schedule', 'sparse_layers', 'vision']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .deepstack import DeepstackFeed, DeepstackHooks
from .description import Extension
from .plan import ForwardCall
from .qwen2_vl import MropePositions, QwenVLAdapter
from .spans import consecutive_runs

__all__ = [
    "Qwen3VLAdapter",
    "VisualItem",
    "find_visual_items",
    "refine_item",
    "without_video_text",
    "DeepstackFeed",
    "DeepstackHooks",
]

#: An item's layout: (t, h, w) in language-model tokens, or its token count alone (layout unknown).
Layout = Union[tuple[int, int, int], int]

# ------------------------------------------------------------------------------------------------
# Visual items: images and frame-by-frame videos
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisualItem:
    """One image or video as the language model sees it.

    Attributes:
        sample: batch row of the model input.
        kind: "image" or "video".
        grid: (t, h, w) in language-model tokens; when only the token count n is known (`generate`), (1, 1, n)
            for an image and (frames, 1, n / frames) for a video until `refine_item`.
        pieces: (start, length) of each placeholder run the item occupies, in order: one for an image, one per
            frame for a video (frames are separated by a timestamp and the vision start / end tokens).
    """

    sample: int
    kind: str
    grid: tuple[int, int, int]
    pieces: tuple[tuple[int, int], ...]

    @property
    def start(self) -> int:
        return self.pieces[0][0]

    @property
    def stop(self) -> int:
        """One past the item's last placeholder."""
        return self.pieces[-1][0] + self.pieces[-1][1]

    @property
    def length(self) -> int:
        return sum(length for _, length in self.pieces)

    def positions(self) -> list[int]:
        """Sequence positions of the item's placeholders, in order."""
        return [p for start, length in self.pieces for p in range(start, start + length)]


def _pieces_of(kind: str, layout: Layout) -> Optional[list[int]]:
    """Placeholder-run lengths of one item: images one run, videos one run per frame; None when unknown
    (a video given by its token count: every following run is one frame)."""
    if isinstance(layout, int):
        return [layout] if kind == "image" else None
    t, h, w = layout
    return [t * h * w] if kind == "image" else [h * w] * t


def find_visual_items(
    input_ids: Tensor,
    images: Sequence[Layout],
    videos: Sequence[Layout],
    *,
    image_token_id: int,
    video_token_id: int,
) -> tuple[VisualItem, ...]:
    """Locate every image and video in ``input_ids`` (B, L), in sequence order.

    ``images`` / ``videos``: per item in batch order (as the model consumes them), its (t, h, w) in
    language-model tokens, or its token count when the layout is unknown (`refine_item` then reads it from the
    M-RoPE ids). Each run of image placeholders is cut into consecutive images; a video with grid (t, h, w) takes
    its t frames of h * w placeholders from the following video runs (a run may hold several frames), all in one
    sample; a video known by its count takes whole runs (one frame each) until the count is covered. Raises
    ``ValueError`` when placeholders and items disagree.

    >>> ids = torch.tensor([[5, 9, 9, 6, 40, 8, 8, 41, 8, 8, 7]])  # an image, then a video of 2 frames
    >>> items = find_visual_items(ids, [(1, 1, 2)], [(2, 1, 2)], image_token_id=9, video_token_id=8)
    >>> [(i.kind, i.grid, i.pieces) for i in items]
    [('image', (1, 1, 2), ((1, 2),)), ('video', (2, 1, 2), ((5, 2), (8, 2)))]
    >>> find_visual_items(ids, [2], [4], image_token_id=9, video_token_id=8)[1].pieces
    ((5, 2), (8, 2))
    """
    items: list[VisualItem] = []
    for kind, token_id, queue in (("image", image_token_id, list(images)), ("video", video_token_id, list(videos))):
        runs = [
            (sample, start, length)
            for sample in range(input_ids.shape[0])
            for start, length in consecutive_runs((input_ids[sample] == token_id).nonzero().flatten().tolist())
        ]
        run, offset = 0, 0  # the next unused placeholder: run number, offset inside it
        for number, layout in enumerate(queue):
            wanted = _pieces_of(kind, layout)
            total = layout if isinstance(layout, int) else None
            pieces: list[tuple[int, int]] = []
            sample = None
            while (wanted is not None and len(pieces) < len(wanted)) or (
                wanted is None and sum(n for _, n in pieces) < total
            ):
                if run == len(runs):
                    raise ValueError(f"{kind} {number} ({layout}) has no placeholder tokens (id {token_id}) left")
                row, start, length = runs[run]
                if sample is not None and row != sample:
                    raise ValueError(f"{kind} {number} ({layout}) spans two samples")
                sample = row
                covered = sum(n for _, n in pieces)
                size = wanted[len(pieces)] if wanted is not None else min(length - offset, total - covered)
                if offset + size > length:
                    raise ValueError(
                        f"{kind} {number} ({layout}) needs {size} placeholder tokens at position {start + offset} of "
                        f"row {row}, but the run has {length - offset} left"
                    )
                pieces.append((start + offset, size))
                offset += size
                if offset == length:
                    run, offset = run + 1, 0
            if isinstance(layout, int):
                sizes = {n for _, n in pieces}
                grid = (len(pieces), 1, pieces[0][1]) if len(sizes) == 1 else (1, 1, layout)
            else:
                grid = tuple(int(v) for v in layout)
            items.append(VisualItem(int(sample), kind, grid, tuple(pieces)))
        if run != len(runs):
            raise ValueError(f"the {len(queue)} {kind}s given cover only part of the {kind} placeholder tokens")
    return tuple(sorted(items, key=lambda item: (item.sample, item.start)))


def refine_item(item: VisualItem, position_ids: Tensor) -> VisualItem:
    """The item's (t, h, w) read back from its M-RoPE ids ((3, B, L) or (4, B, L)): every piece of an image, or
    every frame of a video, has the height and width extents h and w; unchanged when they do not factor it."""
    rows = position_ids[-3:, item.sample]  # (3, L)
    shapes = set()
    for start, length in item.pieces:
        height = int(rows[1, start : start + length].max() - rows[1, start : start + length].min()) + 1
        width = int(rows[2, start : start + length].max() - rows[2, start : start + length].min()) + 1
        shapes.add((height, width) if height * width == length else None)
    if len(shapes) != 1 or None in shapes:
        return item
    (height, width), = shapes
    frames = len(item.pieces) if item.kind == "video" else 1
    if frames * height * width != item.length:
        return item
    return VisualItem(item.sample, item.kind, (frames, height, width), item.pieces)


def without_video_text(
    spans: list[Tensor], query: Tensor, items: Sequence[VisualItem], vision: Tensor
) -> tuple[list[Tensor], Tensor]:
    """Remove the videos' frame timestamps from each prompt span: the text between a video's first and last
    frame, and the text right before its first frame's ``<|vision_start|>`` back to the previous vision token
    (Qwen3-VL writes ``<|vision_start|><0.5 seconds><|vision_start|>frame<|vision_end|><1.5 seconds>...``). The
    query becomes the last remaining position (unchanged when nothing remains).

    Args:
        spans: per sample, (T_b,) long prompt positions; query: (B,) long.
        vision: (B, L) bool, True at vision tokens (placeholders, vision start / end).

    >>> vision = torch.tensor([[0, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0]]).bool()  # q <vs> t0 <vs> f <ve> t1 <vs> f <ve> q q
    >>> item = VisualItem(0, "video", (2, 1, 1), ((4, 1), (8, 1)))
    >>> spans, query = without_video_text([torch.tensor([0, 2, 6, 10, 11])], torch.tensor([11]), [item], vision)
    >>> spans[0].tolist(), query.tolist()
    ([0, 10, 11], [11])
    """
    out, queries = [], []
    for row, span in enumerate(spans):
        inside = torch.zeros_like(span, dtype=torch.bool)
        for item in items:
            if item.sample != row or item.kind != "video":
                continue
            lead = item.start - 1
            if lead >= 0 and bool(vision[row, lead]):
                lead -= 1  # the first frame's own <|vision_start|>
            while lead >= 0 and not bool(vision[row, lead]):
                lead -= 1  # its timestamp
            inside |= (span > lead) & (span < item.stop)
        kept = span[~inside]
        if kept.numel():
            out.append(kept)
            queries.append(kept[-1].to(query.device))
        else:
            out.append(span)
            queries.append(query[row])
    return out, torch.stack(queries).long() if queries else query


# ------------------------------------------------------------------------------------------------
# The adapter
# ------------------------------------------------------------------------------------------------


def _layouts(grid_thw: Optional[Tensor], encoded: Any, merge_size: int) -> list[Layout]:
    """Per item: (t, h, w) in LLM tokens from the processor's ``*_grid_thw``, else the token count of each
    precomputed tower output (``generate``'s ``mm_encoder_outputs[modality].pooler_output``)."""
    if grid_thw is not None:
        return [(int(t), int(h) // merge_size, int(w) // merge_size) for t, h, w in grid_thw.tolist()]
    if encoded is not None:
        return [int(item.shape[0]) for item in encoded.pooler_output]
    return []


def cut_items(
    call: ForwardCall, kinds: Tensor, image_token_id: int, video_token_id: int, merge_size: int
) -> tuple[VisualItem, ...]:
    """The images and videos of the forward ``call``, in sequence order: `find_visual_items` on ``kinds`` ((B, L)
    ids, videos marked with ``video_token_id``) with the layouts of the call's ``*_grid_thw`` (else of
    ``mm_encoder_outputs``), the items counted without grids refined from 3-D ``position_ids`` (`refine_item`)."""
    kwargs = call.kwargs
    encoded = kwargs.get("mm_encoder_outputs") or {}
    images = _layouts(kwargs.get("image_grid_thw"), encoded.get("image"), merge_size)
    videos = _layouts(kwargs.get("video_grid_thw"), encoded.get("video"), merge_size)
    items = find_visual_items(kinds, images, videos, image_token_id=image_token_id, video_token_id=video_token_id)
    positions = kwargs.get("position_ids")
    if positions is not None and positions.dim() == 3 and positions.shape[0] in (3, 4):
        counted = {kind for kind in ("image", "video") if kwargs.get(f"{kind}_grid_thw") is None}
        items = tuple(refine_item(item, positions) if item.kind in counted else item for item in items)
    return items


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: ViT with learned + 2-D rotary positions, a patch merger and DeepStack mergers; Qwen3 decoder
    (q/k norms) with interleaved M-RoPE."""

    name: ClassVar[str] = "qwen3_vl"
    description: ClassVar[str] = (
        "Qwen3-VL (Qwen3VLForConditionalGeneration, Qwen3VLModel): dynamic resolution, interleaved M-RoPE, "
        "images and timestamped videos, DeepStack features pruned with the tokens"
    )
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")
    limitations: ClassVar[dict[str, str]] = {
        "cls_attention": "the Qwen3-VL vision tower has no CLS token",
        "visual_keys": "at vision: the Qwen3-VL vision tower has no CLS layer to take keys from",
        "pre_llm_clip": "Qwen3-VL's tower is not a CLIP model: no CLIP text space",
    }

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.deepstack_layers = len(getattr(self.config.vision_config, "deepstack_visual_indexes", ()) or ())

    @property
    def vision_width(self) -> int:
        """Dv, the main patch merger's per-patch width (``project`` goes through that merger, not the DeepStack
        mergers)."""
        return int(self.config.vision_config.hidden_size)

    def window_order(self, grid_thw: Tensor) -> Optional[Tensor]:
        return None  # no window attention in the Qwen3-VL tower

    def segments(self, call: ForwardCall) -> tuple[VisualItem, ...]:
        """The images and videos of the forward in flight, in sequence order (`find_visual_items`)."""
        return cut_items(call, call.input_ids, self.image_token_id, self.video_token_id, self.merge_size)

    def extensions(self) -> tuple[Extension, ...]:
        """M-RoPE positions (as Qwen2-VL), then the DeepStack hooks (after the decoder machinery's)."""
        deepstack = DeepstackHooks(self.name, type(self.model).__name__, self.stack, self.deepstack_layers)
        return (MropePositions(self.stack), deepstack)

    def prompt_span(
        self, call: ForwardCall, image_mask: Tensor, mask2d: Tensor, prompt_stop: Optional[Sequence[int]]
    ) -> tuple[list[Tensor], Tensor]:
        """The Qwen rule, without the text inside videos (frame timestamps, `without_video_text`)."""
        spans, query = super().prompt_span(call, image_mask, mask2d, prompt_stop)
        items = self.segments(call)
        if any(item.kind == "video" for item in items):
            ids = call.input_ids.to(mask2d.device)
            vision = torch.isin(ids, torch.tensor(sorted(self.vision_token_ids), device=ids.device))  # (B, L)
            spans, query = without_video_text(spans, query, items, vision)
        return spans, query
