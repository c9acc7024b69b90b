"""Records of a pruned forward exposed on the handle: `DropRecord`, `PruneResult` (``handle.last_selection``)
and the per-image `ImageLayout` an adapter describes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from vtprune.framework.selection import Selection

__all__ = ["DropRecord", "DecodeRecord", "PruneResult", "ImageLayout", "with_frames", "frame_positions"]


@dataclass(frozen=True)
class DropRecord:
    """One drop of the last pruned forward.

    Attributes:
        where: "vision", "pre_llm", "layer" or "vision_layers".
        layer: decoder layer before which tokens were dropped (0 for vision / vision_layers / pre_llm).
        budgets: the budget of each image row at this drop.
        selection: `Selection` over image rows; ``indices`` are positions among the image's own tokens
            (0..num_tokens-1, the order in which the image's placeholders appear in the input): the *original*
            tokens, also after an earlier drop wrote other tokens into the image's slots (``append_merged``). After a
            merging stage, ``sizes`` and ``assignment`` (image-token coordinates: every token of the image -> the kept
            slot it was merged into, -1 when absent or dropped unmerged). ``vision_layers`` (ToMe in the tower):
            ``indices`` are the image's first k placeholder slots, which hold the merged tokens in ToMe's order,
            and ``assignment`` maps each of the image's patches to its slot (FlowCut in the tower: the kept patches,
            ascending, sizes 1, -1 for a pruned patch).
        before: (R,) tokens of each image present before this drop.
    """

    where: str
    layer: int
    budgets: tuple
    selection: Selection
    before: Tensor
    patches: Optional[Selection] = None

    # ``patches``: only when the LLM tokens are not the image's own tokens (VisionZip ``keep_cls=True`` at
    # ``vision``): the pipeline's selection over the image's patches (image-token coordinates). ``selection``
    # then describes the image's placeholder slots the LLM receives: slot 0 holds the CLS token, the next
    # slots the dominant then the contextual patches, each group in ascending patch order (``critical`` is True
    # for CLS and dominant; ``values`` are the vision-space values before the projector).

    @property
    def counts(self) -> Tensor:
        return self.selection.counts


@dataclass(frozen=True)
class DecodeRecord:
    """One decoding step of placement ``decode``: the visual cache entries hidden from layers ``>= layer``.

    Attributes:
        step: 0 for the first token generated after the prefill's own, then 1, 2, ...
        layer: first decoder layer that no longer sees them.
        hidden: per batch row, (n_b,) long original sequence positions of the visual entries the prefill left in
            layer ``layer - 1``'s cache that are hidden at this step (ascending).
    """

    step: int
    layer: int
    hidden: tuple[Tensor, ...]


@dataclass(frozen=True)
class PruneResult:
    """What the last pruned forward kept (``handle.last_selection``).

    Attributes:
        drops: one :class:`DropRecord` per drop, in model order.
        image_sample: (R,) batch row of each image row.
        num_tokens: (R,) tokens of each image before any drop.
        image_positions: tuple of (num_tokens[r],) long: original sequence positions of each image's tokens.
        sequence_index: (B, L') original sequence position of every slot after the last drop (what the
            output logits / last hidden states are aligned with).
        sequence_mask: (B, L') bool, False for filler slots.
        decode_records: placement ``decode``: one `DecodeRecord` per decoding step (appended while decoding).
    """

    drops: tuple[DropRecord, ...]
    image_sample: Tensor
    num_tokens: Tensor
    image_positions: tuple[Tensor, ...]
    sequence_index: Tensor
    sequence_mask: Tensor
    #: placement ``decode``: one `DecodeRecord` per decoding step that continued this prefill's cache.
    decode_records: list = field(default_factory=list, compare=False)

    @property
    def selection(self) -> Selection:
        """The final kept tokens per image (image-token coordinates); every token when nothing was dropped."""
        if self.drops:
            return self.drops[-1].selection
        width = int(self.num_tokens.max().item()) if self.num_tokens.numel() else 0
        arange = torch.arange(width).expand(len(self.num_tokens), -1)
        mask = arange < self.num_tokens.unsqueeze(1)
        return Selection(torch.where(mask, arange, 0), mask, torch.zeros_like(mask))

    @property
    def counts(self) -> Tensor:
        """(R,) tokens kept per image after the last drop."""
        return self.selection.counts

    @property
    def per_layer_counts(self) -> dict[int, Tensor]:
        """{drop layer: (R,) tokens kept per image from that layer on}."""
        return {record.layer: record.counts for record in self.drops}

    def kept_positions(self, image: int) -> Tensor:
        """Original sequence positions of the tokens image ``image`` keeps."""
        return self.image_positions[image][self.selection.row_indices(image).cpu()]


@dataclass(frozen=True)
class ImageLayout:
    """The language-model tokens of one image.

    Attributes:
        num_tokens: placeholder tokens of the image in the input.
        newline: (num_tokens,) bool, True at image-newline tokens (LLaVA-NeXT); None if there are none.
        grid: (h, w) when the image's tokens are exactly a row-major patch grid; else None.
        kind: "image" or "video" (Qwen); which vision-tower run the item's features come from.
        frames: (T, H, W) of a video item whose frame tokens are frame-major (frame t, then row-major h, w);
            None for images (and videos with no frame grid). Set through `with_frames`.
        frame_index: (num_tokens,) long, the frame of each token, -1 outside the frame grids (newline /
            separator / per-frame CLS tokens); None when ``frames`` is None. Set through `with_frames`.
        views: (num_tokens,) long, the view each token comes from (LLaVA-NeXT, LLaVA-OneVision: 0 = base image,
            1 = high-resolution crops), -1 at tokens of no view (newlines); None = the image is one view (`Signals.view_index`).
    """

    num_tokens: int
    newline: Optional[Tensor] = None
    grid: Optional[tuple[int, int]] = None
    kind: str = "image"
    frames: Optional[tuple[int, int, int]] = None
    frame_index: Optional[Tensor] = None
    views: Optional[Tensor] = None


def frame_positions(num_tokens: int, frames: tuple[int, int, int], outside: Optional[Tensor] = None) -> Tensor:
    """(num_tokens,) long: the frame of each token of an item whose tokens other than ``outside`` ((num_tokens,)
    bool, True at newline / separator tokens; None = none) are a frame-major (T, H, W) grid; -1 at ``outside``.
    Raises ``ValueError`` when the item's other tokens are not T*H*W.

    >>> frame_positions(5, (2, 1, 2), torch.tensor([False, False, False, False, True])).tolist()
    [0, 0, 1, 1, -1]
    """
    t, h, w = (int(v) for v in frames)
    inside = torch.ones(num_tokens, dtype=torch.bool) if outside is None else ~outside.cpu().bool()  # (n,)
    if int(inside.sum()) != t * h * w:
        raise ValueError(
            f"a video item of {num_tokens} tokens ({num_tokens - int(inside.sum())} outside the frames) cannot hold "
            f"frames (T, H, W) = {(t, h, w)} ({t * h * w} frame tokens)"
        )
    index = torch.full((num_tokens,), -1, dtype=torch.long)
    index[inside] = torch.arange(t * h * w, dtype=torch.long) // max(h * w, 1)
    return index


def with_frames(layout: ImageLayout, frames: Optional[tuple[int, int, int]], outside: Optional[Tensor] = None) -> ImageLayout:
    """The one way an adapter gives a video item its frame structure: ``layout`` with ``frames`` = (T, H, W) and
    its `frame_positions` (``outside``: the item's tokens that are not frame-grid tokens, e.g. a video's trailing
    newline or each frame's CLS token). ``frames`` None (or an image layout) returns ``layout`` unchanged."""
    if frames is None or layout.kind != "video":
        return layout
    frames = tuple(int(v) for v in frames)
    return dataclasses.replace(layout, frames=frames, frame_index=frame_positions(layout.num_tokens, frames, outside))
