"""Records of a pruned forward exposed on the handle: `DropRecord`, `PruneResult` (``handle.last_selection``)
and the per-image `ImageLayout` an adapter describes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from vtprune.framework.selection import Selection

__all__ = ["DropRecord", "DecodeRecord", "PruneResult", "ImageLayout"]


@dataclass(frozen=True)
class DropRecord:
    """One drop of the last pruned forward.

    Attributes:
        where: "vision", "pre_llm", "layer" or "vision_layers".
        layer: decoder layer before which tokens were dropped (0 for vision / vision_layers / pre_llm).
        budgets: the budget of each image row at this drop.
        selection: `Selection` over image rows; ``indices`` are positions among the image's own tokens
            (0..num_tokens-1, the order in which the image's placeholders appear in the input). After a merging
            stage, ``sizes`` and ``assignment`` (image-token coordinates: every token of the image -> the kept
            slot it was merged into, -1 when absent or dropped unmerged). ``vision_layers`` (ToMe in the tower):
            ``indices`` are the image's first k placeholder slots, which hold the merged tokens in ToMe's order,
            and ``assignment`` maps each of the image's patches to its slot.
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
    """

    num_tokens: int
    newline: Optional[Tensor] = None
    grid: Optional[tuple[int, int]] = None
    kind: str = "image"
