"""Where the visual items and the prompt are in a model input: one subsequence finder, the LLaVA prompt rule
(`prompt_positions`) and the Qwen rules (`find_visual_segments`, `prompt_span`). Pure functions, no model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "find_subsequence",
    "consecutive_runs",
    "prompt_positions",
    "last_real_tokens",
    "VisualSegment",
    "find_visual_segments",
    "llm_grids",
    "refine_grid",
    "prompt_span",
    "segment_lengths",
]


def find_subsequence(row: Tensor, pattern: Sequence[int], start: int) -> int:
    """First index >= start where ``pattern`` occurs in ``row`` (1-D); -1 if none (or ``pattern`` is empty).

    >>> find_subsequence(torch.tensor([1, 2, 3, 2, 3]), [2, 3], 2)
    3
    """
    if not pattern:
        return -1
    pattern = list(pattern)
    n = len(pattern)
    values = row.tolist()
    for i in range(start, len(values) - n + 1):
        if values[i : i + n] == pattern:
            return i
    return -1


def consecutive_runs(positions: list[int]) -> list[tuple[int, int]]:
    """(start, length) of each run of consecutive integers in the sorted ``positions``.

    >>> consecutive_runs([2, 3, 4, 7, 8])
    [(2, 3), (7, 2)]
    """
    runs: list[tuple[int, int]] = []
    for position in positions:
        if runs and runs[-1][0] + runs[-1][1] == position:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((position, 1))
    return runs


def last_real_tokens(mask2d: Tensor) -> Tensor:
    """(B,) long: the position of each row's last real token (``mask2d`` (B, L), nonzero = real; left or right
    padding): the query token under the ``last_token_query`` hint (HoliTom's ``[0, -1]``).

    >>> last_real_tokens(torch.tensor([[0, 1, 1], [1, 1, 0]])).tolist()
    [2, 1]
    """
    positions = torch.arange(mask2d.shape[1], device=mask2d.device).expand_as(mask2d)  # (B, L)
    return torch.where(mask2d.bool(), positions, torch.full_like(positions, -1)).amax(dim=1)  # (B,)


def prompt_positions(
    image_mask: Tensor,
    real: Tensor,
    input_ids: Optional[Tensor] = None,
    prompt_stop: Optional[Sequence[int]] = None,
) -> tuple[list[Tensor], Tensor]:
    """The prompt span of every sample and its scoring query token.

    Rule (all LLaVA-family adapters): the prompt is the real (attention-mask 1) text tokens *after the
    sample's last image token*, up to the end of the input, or up to the first occurrence of
    ``prompt_stop`` (a token-id sequence marking the end of the user turn, e.g. the ids of
    ``" ASSISTANT:"``) after the last image. This skips the chat template's system prefix and the image
    placeholders. A sample with no text after its images uses all its real text tokens; a sample with no
    text at all has an empty prompt. The query token (whose attention row scores the image tokens at
    layer drops) is the last prompt token, or the last real token when the prompt is empty.

    Args:
        image_mask: (B, L) bool, True at image placeholder tokens.
        real: (B, L) bool, the 2-D attention mask.
        input_ids: (B, L) ids, needed for ``prompt_stop``.

    Returns:
        (list of (T_b,) long positions per sample, (B,) long query positions)
    """
    batch, length = image_mask.shape
    spans, queries = [], []
    arange = torch.arange(length, device=image_mask.device)
    for b in range(batch):
        text = real[b] & ~image_mask[b]
        images = image_mask[b].nonzero().flatten()
        start = int(images[-1].item()) + 1 if images.numel() else 0
        stop = length
        if prompt_stop and input_ids is not None:
            found = find_subsequence(input_ids[b], prompt_stop, start)
            if found >= 0:
                stop = found
        span = text & (arange >= start) & (arange < stop)
        if not bool(span.any()):
            span = text
        positions = span.nonzero().flatten()
        spans.append(positions)
        if positions.numel():
            queries.append(positions[-1])
        else:
            reals = real[b].nonzero().flatten()
            queries.append(reals[-1] if reals.numel() else torch.tensor(length - 1, device=image_mask.device))
    return spans, torch.stack(queries).long()


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
            for start, length in consecutive_runs(positions):
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
                found = find_subsequence(input_ids[row], prompt_stop, last)
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


def segment_lengths(segments: Sequence[Any], num_tokens: int, name: str, what: str) -> list[int]:
    """Token count of each item (anything with a ``length``), in order; raises when they do not add up to the
    ``num_tokens`` visual placeholders of the forward (``what`` names the items in the message).

    >>> segment_lengths([VisualSegment(0, "image", 1, (1, 2, 2))], 4, "x", "the grids")
    [4]
    """
    counts = [int(segment.length) for segment in segments]
    if sum(counts) != num_tokens:
        raise ValueError(f"{name}: {what} cover {sum(counts)} of the {num_tokens} visual tokens")
    return counts
