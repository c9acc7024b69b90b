"""Adapter for Qwen3-VL (``Qwen3VLForConditionalGeneration``, ``Qwen3VLModel``): dynamic resolution,
interleaved M-RoPE, images, videos with frame timestamps, and DeepStack.

It reuses the Qwen2-VL adapter (``adapters.qwen2_vl``: prompt span, ``(4, B, L)`` stack positions, ``keep`` /
``compact``, rope deltas when decoding, the ``vision`` capture before the patch merger) and the decoder
machinery (``adapters.decoder``). What is Qwen3-specific lives here:

- **DeepStack** (`DeepstackFeed`): the vision tower also returns features of intermediate vision layers, and
  ``Qwen3VLTextModel`` adds the i-th of them to the visual tokens' hidden states after decoder layer i
  (``hidden[visual_pos_masks] += deepstack_visual_embeds[i]``, in ``_deepstack_process``). A forward pre-hook on
  that one text model (after the decoder machinery's, so a drop at the decoder input has happened) replaces the
  two keyword arguments by the mask and rows of the sequence the stack actually runs on, in a `DeepstackFeed`
  whose ``len()`` stops at the first ``layer(k)`` drop: the model adds the features of the layers before it
  itself. For a DeepStack layer i >= k, a forward hook on layer i adds them to the kept visual slots with the
  model's own ``_deepstack_process``. A kept token keeps receiving exactly its own features, a dropped one
  nothing, layers before a ``layer(k)`` drop see the full sequence, and no tensor is modified in place (autograd
  works); nothing of the model is reassigned.
- **Visual items** (`find_visual_items`): a Qwen3-VL video is written frame by frame, each frame its own run of
  ``h * w`` placeholders between ``<|vision_start|>`` / ``<|vision_end|>`` and preceded by a timestamp
  (``<0.5 seconds>``). One `Signals` row per image and per *video* (all its frames); the timestamps are not part
  of the prompt span. M-RoPE positions and decoding are the Qwen2 adapter's (the text model's rotary module
  interleaves the three axes itself; its ``rope_deltas`` are ``max id + 1 - prompt length`` as in Qwen2-VL).
- **Vision placement**: as Qwen2-VL (merge units before the main patch merger; the DeepStack mergers are not
  selection inputs); the kept tokens keep their own DeepStack features.
- **Not provided**: ``cls_attention`` (no CLS token) and ``visual_keys`` at ``vision``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from vtprune.framework.errors import VtpruneError

from .base import _Call
from .decoder import Session
from .qwen2_vl import QwenAttachment, QwenPlan, QwenVLAdapter, _runs

__all__ = [
    "Qwen3VLAdapter",
    "VisualItem",
    "find_visual_items",
    "refine_item",
    "without_video_text",
    "DeepstackFeed",
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
            for start, length in _runs((input_ids[sample] == token_id).nonzero().flatten().tolist())
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
# DeepStack
# ------------------------------------------------------------------------------------------------


class DeepstackFeed(SequenceABC):
    """The ``deepstack_visual_embeds`` a pruned prefill gives ``Qwen3VLTextModel``, with the matching
    ``visual_pos_masks`` (`mask`).

    Built from the model's own mask (B, L) and features (one (n_visual, D) tensor per DeepStack layer, rows in
    row-major order of the mask) and the decoder machinery's `Session` of the prefill in flight, whose segments
    grow as drops happen. Nothing is ever modified in place (neither the model's tensors nor this object's).

    - `mask` and the items are those of **segment 0**, the sequence the stack runs on before any ``layer(k)`` drop
      (compacted by a ``pre_llm`` / ``vision`` drop): the visual slots, and the rows of the visual tokens present.
      Without a drop at the input they are the model's own mask and tensors (a keep-all forward is bit-identical).
    - ``len()`` is what the text model reads after every layer to decide whether it adds DeepStack features: the
      number of DeepStack layers, cut at the first ``layer(k)`` drop once it has happened. So the model adds the
      features of layer i itself exactly while layer i runs on segment 0.
    - `after_layer` gives the (mask, rows) of a DeepStack layer that runs on a later segment (after a ``layer(k)``
      drop with k inside the DeepStack layers): the adapter adds them with the model's own ``_deepstack_process``
      from a forward hook on that layer. Reading an item of a later segment raises (a text model that read the
      length once would otherwise add the wrong rows).
    """

    def __init__(self, mask: Tensor, features: Sequence[Tensor], session: Session):
        self._full = mask.bool()  # (B, L) in the stack input's (original) coordinates
        self._features = list(features)
        self._session = session
        flat = self._full.flatten().long()
        self._rank = (flat.cumsum(0) - 1).view_as(self._full)  # (B, L) feature row of each visual position
        self._states: dict[int, tuple[Tensor, Optional[Tensor]]] = {}
        present, rows = self._state(0)
        self.mask = mask if rows is None else present

    def _state(self, number: int) -> tuple[Tensor, Optional[Tensor]]:
        """(visual slots (B, Ls) bool, feature rows, None for all of them) of segment ``number``."""
        if number not in self._states:
            segment = self._session.segments[number]
            index = segment.index.to(self._full.device)
            present = self._full.gather(1, index) & segment.valid.to(self._full.device)
            rows = self._rank.gather(1, index)[present]
            identity = present.shape == self._full.shape and torch.equal(present, self._full)
            self._states[number] = (present, None if identity else rows)
        return self._states[number]

    def _rows(self, layer: int, number: int) -> Tensor:
        feature = self._features[layer]
        rows = self._state(number)[1]
        return feature if rows is None else feature.index_select(0, rows.to(feature.device))

    def __len__(self) -> int:
        segments = self._session.segments
        return min(len(self._features), segments[1].start) if len(segments) > 1 else len(self._features)

    def __getitem__(self, layer):
        if isinstance(layer, slice):
            return [self[i] for i in range(len(self._features))[layer]]
        layer = operator.index(layer)
        layer = layer + len(self._features) if layer < 0 else layer
        if self._session.segment_of(layer) != 0:
            raise RuntimeError(
                f"DeepStack features of layer {layer} were read by the text model after a drop before layer "
                f"{self._session.segments[1].start}; this transformers version is not supported by the qwen3_vl adapter"
            )
        return self._rows(layer, 0)

    def after_layer(self, layer: int) -> Optional[tuple[Tensor, Tensor]]:
        """(visual slots (B, Ls), features (n, D)) to add after ``layer`` when it runs on a segment after a drop;
        None when the model adds them itself (segment 0) or the layer has no DeepStack features."""
        if layer >= len(self._features):
            return None
        number = self._session.segment_of(layer)
        if number == 0:
            return None
        return self._state(number)[0], self._rows(layer, number)


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


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: ViT with learned + 2-D rotary positions, a patch merger and DeepStack mergers; Qwen3 decoder
    (q/k norms) with interleaved M-RoPE."""

    name: ClassVar[str] = "qwen3_vl"
    description: ClassVar[str] = (
        "Qwen3-VL (Qwen3VLForConditionalGeneration, Qwen3VLModel): dynamic resolution, interleaved M-RoPE, "
        "images and timestamped videos, DeepStack features pruned with the tokens"
    )
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")
    placements: ClassVar[frozenset[str]] = frozenset({"vision", "pre_llm", "layer", "schedule"})
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

    def segments(self, call: _Call) -> tuple[VisualItem, ...]:
        """The images and videos of the forward in flight, in sequence order (`find_visual_items`)."""
        kwargs = call.kwargs
        encoded = kwargs.get("mm_encoder_outputs") or {}
        images = _layouts(kwargs.get("image_grid_thw"), encoded.get("image"), self.merge_size)
        videos = _layouts(kwargs.get("video_grid_thw"), encoded.get("video"), self.merge_size)
        items = find_visual_items(
            call.input_ids, images, videos, image_token_id=self.image_token_id, video_token_id=self.video_token_id
        )
        positions = kwargs.get("position_ids")
        if positions is not None and positions.dim() == 3 and positions.shape[0] in (3, 4):
            counted = {kind for kind in ("image", "video") if kwargs.get(f"{kind}_grid_thw") is None}
            items = tuple(refine_item(item, positions) if item.kind in counted else item for item in items)
        return items


class Qwen3Attachment(QwenAttachment):
    """`QwenAttachment` plus the DeepStack hooks: a forward pre-hook on the text model (after the decoder
    machinery's) that hands it a `DeepstackFeed` and its mask during a pruned prefill, a forward hook that
    releases it, and forward hooks on the DeepStack layers that add their features after a ``layer(k)`` drop."""

    adapter: Qwen3VLAdapter

    def __init__(self, adapter: Qwen3VLAdapter, pipeline: Any, budget: Any, *, positions: str, prompt_stop=None, **options):
        self._feeds: list[Optional[DeepstackFeed]] = []
        stack = adapter.stack
        if adapter.deepstack_layers and not callable(getattr(stack, "_deepstack_process", None)):
            raise VtpruneError(
                f"{type(adapter.model).__name__} (adapter {adapter.name!r}): {type(stack).__name__} has no "
                "_deepstack_process; DeepStack features cannot be pruned with this transformers version"
            )
        super().__init__(adapter, pipeline, budget, positions=positions, prompt_stop=prompt_stop, **options)
        try:
            self._handles.append(stack.register_forward_pre_hook(self._deepstack_pre, with_kwargs=True))
            self._handles.append(stack.register_forward_hook(self._deepstack_post, with_kwargs=True, always_call=True))
            for number, layer in enumerate(list(stack.layers)[: adapter.deepstack_layers]):
                self._handles.append(layer.register_forward_hook(self._deepstack_layer(number)))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        super().remove()
        self._feeds.clear()

    # -- DeepStack hooks -------------------------------------------------------------------------------

    def _deepstack_pre(self, module, args, kwargs):
        """Runs after the decoder machinery's stack pre-hook (a drop at the decoder input has happened)."""
        session = self.decoder.prefill_session
        mask, features = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
        if session is None or mask is None or features is None or len(features) == 0:
            self._feeds.append(None)
            return None
        if tuple(mask.shape) != (session.segments[0].index.shape[0], session.length):
            self._feeds.append(None)
            raise RuntimeError(
                f"{self.adapter.name}: visual_pos_masks has shape {tuple(mask.shape)}, the prefill has "
                f"{session.length} tokens; DeepStack features cannot be aligned with the pruned sequence"
            )
        feed = DeepstackFeed(mask, features, session)
        self._feeds.append(feed)
        kwargs = dict(kwargs)
        kwargs["visual_pos_masks"] = feed.mask
        kwargs["deepstack_visual_embeds"] = feed
        return args, kwargs

    def _deepstack_post(self, module, args, kwargs, output):
        if self._feeds:
            self._feeds.pop()
        return None

    def _deepstack_layer(self, number: int):
        """Forward hook of DeepStack layer ``number``: after a drop at a layer <= ``number``, add its features to
        the kept visual tokens (the text model adds them itself only on the undropped sequence)."""

        def hook(module, args, output):
            feed = self._feeds[-1] if self._feeds else None
            extra = feed.after_layer(number) if feed is not None else None
            if extra is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = self.adapter.stack._deepstack_process(hidden, *extra)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook


class Qwen3Plan(QwenPlan):
    """`QwenPlan` whose prompt span leaves out the text inside videos (frame timestamps)."""

    def __init__(self, owner: Qwen3Attachment, call: _Call, embeds: Tensor, image_mask: Tensor, mask2d: Tensor):
        super().__init__(owner, call, embeds, image_mask, mask2d)
        items = owner.adapter.segments(call)
        if any(item.kind == "video" for item in items):
            ids = call.input_ids.to(embeds.device)
            vision = torch.isin(ids, torch.tensor(sorted(owner.adapter.vision_token_ids), device=ids.device))
            self.prompts, query = without_video_text(self.prompts, self.query, items, vision)
            self.query = query.to(self.device)


Qwen3Attachment.plan_class = Qwen3Plan
Qwen3VLAdapter.attachment_class = Qwen3Attachment
