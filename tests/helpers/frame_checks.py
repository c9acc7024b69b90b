"""Checks of ``Signals.frames`` / ``frame_index`` on real video adapters (issue 15), shared by the family tests.

A family test describes what each `Signals` row must be, from the model's own outputs and the input it built
(never from the adapter): `Row` (the item's kind, its (T, H, W) or None, the positions of its tokens that are
outside the frame grids, and the model's own per-frame features as (T, H*W, D) when known). `check_frames`
records the `Signals` at every drop of a pre_llm, a layer(k=1) and a schedule pipeline and compares them;
`check_frames_batch_equals_alone` compares the frame fields of a batch with each sample run alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from adapter_fixtures import SignalRecorder
from vtprune.framework import compose, prune

__all__ = [
    "FRAME_RECIPES", "Row", "record_signals", "expected_frame_index", "check_frames", "check_frames_batch_equals_alone", "grid_rows",
    "placeholder_items",
]

#: One pipeline per placement whose drops carry the frame signals (the schedule's second drop sees broken rows).
FRAME_RECIPES = {
    "pre_llm": "prompt_cosine+critical+fps+pre_llm",
    "layer": "attention+critical+diversity.none+split+layer(k=1)",
    "schedule": "attention+critical+diversity.none+split+schedule(layers=[1,2],ratio=0.5)",
}


@dataclass(frozen=True)
class Row:
    """What one `Signals` row must show.

    Attributes:
        length: tokens of the item.
        frames: (T, H, W) of a video, None for an image.
        outside: positions among the item's tokens that are not frame tokens (newline, per-frame CLS).
        features: (T, H*W, D) the model's own per-frame features of a video (``pre_llm``'s visual), or None.
    """

    length: int
    frames: Optional[tuple[int, int, int]] = None
    outside: tuple[int, ...] = ()
    features: Optional[torch.Tensor] = None


def expected_frame_index(row: Row) -> torch.Tensor:
    """(length,) long written plainly: frame t for the t-th block of H*W non-outside tokens, -1 elsewhere."""
    out = []
    seen = 0
    for position in range(row.length):
        if row.frames is None or position in row.outside:
            out.append(-1)
            continue
        t, h, w = row.frames
        out.append(seen // (h * w))
        seen += 1
    return torch.tensor(out, dtype=torch.long)


def record_signals(model, inputs: dict, recipe: str, forward: Callable, budget=0.5) -> list:
    """The `Signals` of every drop of one pruned forward of ``recipe`` (``forward(model, inputs)``)."""
    recorder = SignalRecorder(compose(recipe))
    with prune(model, recorder, budget=budget):
        forward(model, inputs)
    return recorder.seen


def check_frames(model, inputs: dict, rows: Sequence[Row], forward: Callable, recipes: Optional[dict] = None) -> None:
    """At every drop of each recipe: ``frames`` and ``frame_index`` as ``rows`` say while a row is whole, (0, 0, 0)
    and -1 once tokens of the row were dropped; at ``pre_llm`` the tokens of frame t are the model's own features of
    frame t."""
    for placement, recipe in (recipes or FRAME_RECIPES).items():
        seen = record_signals(model, inputs, recipe, forward)
        assert seen, f"{placement}: no drop was recorded"
        for number, signals in enumerate(seen):
            assert signals.frames is not None and signals.frame_index is not None, placement
            assert signals.frames.shape == (len(rows), 3)
            for r, row in enumerate(rows):
                present = int(signals.visual_mask[r].sum()) if signals.visual_mask is not None else signals.num_tokens
                whole = present == row.length
                if number == 0:
                    assert whole, f"{placement}: row {r} is not whole at the first drop"
                frames = signals.frames[r].tolist()
                index = signals.frame_index[r].cpu()
                if not whole or row.frames is None:
                    assert frames == [0, 0, 0], (placement, number, r, frames)
                    assert bool((index == -1).all()), (placement, number, r)
                    continue
                assert tuple(frames) == row.frames, (placement, r, frames, row.frames)
                assert torch.equal(index[: row.length], expected_frame_index(row)), (placement, r)
                assert bool((index[row.length :] == -1).all())
                if placement == "pre_llm" and row.features is not None:
                    visual = signals.visual[r, : row.length].float().cpu()
                    t_len = row.frames[0]
                    for t in range(t_len):
                        torch.testing.assert_close(visual[index[: row.length] == t], row.features[t].float(), atol=1e-6, rtol=0)


def check_frames_batch_equals_alone(
    model, batch_inputs: dict, alone_inputs: Sequence[dict], forward: Callable, recipes: Optional[dict] = None
) -> None:
    """The frame fields of the batch's rows equal those of each sample run alone (rows in sample order)."""
    for placement, recipe in (recipes or FRAME_RECIPES).items():
        batch = record_signals(model, batch_inputs, recipe, forward)[0]
        alone = [record_signals(model, inputs, recipe, forward)[0] for inputs in alone_inputs]
        frames = torch.cat([signals.frames.cpu() for signals in alone])
        assert torch.equal(batch.frames.cpu(), frames), placement
        r = 0
        for signals in alone:
            for row in range(signals.batch_size):
                width = signals.num_tokens
                assert torch.equal(batch.frame_index[r, :width].cpu(), signals.frame_index[row].cpu()), (placement, r)
                assert bool((batch.frame_index[r, width:] == -1).all())
                r += 1


def grid_rows(model, inputs: dict, layouts: Sequence[Sequence[tuple]]) -> list[Row]:
    """Rows of the Qwen-style families (Qwen2-VL / 2.5-VL, Qwen3-VL(-MoE), GLM-4.1V, LLaVA-OneVision-1.5) from the
    test's own layouts (per sample, (kind, positions, (t, h, w)) in sequence order) and the model's own
    ``get_video_features`` (merged tokens of every video, in batch order, frame-major)."""
    videos = []
    if "pixel_values_videos" in inputs:
        with torch.no_grad():
            out = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        pooled = out.pooler_output if hasattr(out, "pooler_output") else out[0]
        flat = torch.cat(list(pooled)) if isinstance(pooled, (list, tuple)) else pooled.reshape(-1, pooled.shape[-1])
        sizes = [t * h * w for items in layouts for kind, _, (t, h, w) in items if kind == "video"]
        assert flat.shape[0] == sum(sizes)
        videos = list(flat.split(sizes))
    rows = []
    for items in layouts:
        for kind, positions, (t, h, w) in items:
            if kind == "image":
                rows.append(Row(len(positions)))
            else:
                rows.append(Row(len(positions), (t, h, w), (), videos.pop(0).reshape(t, h * w, -1)))
    return rows


def placeholder_items(input_ids: torch.Tensor, image_id: int, video_id: int) -> list[tuple[str, int]]:
    """(kind, length) of every unbroken run of image / video placeholders, sample after sample, in sequence order
    (the LLaVA-family test inputs write each item as one run followed by text)."""
    items = []
    for row in input_ids.tolist():
        previous, length = None, 0
        for token in row + [None]:
            if token == previous and token is not None:
                length += 1
                continue
            if previous in (image_id, video_id):
                items.append(("image" if previous == image_id else "video", length))
            previous, length = token, 1
    return items
