"""Seeded `Signals` factories for stage and pipeline tests.

Every factory is deterministic in its ``seed`` and builds CPU float32 tensors. Rows are independent images:
row b has ``lengths[b]`` real tokens (``visual_mask`` True) followed by padding.

- :func:`make_signals`: random values in every field (the project's historical test factory, bit for bit).
- :func:`ragged_signals`: as :func:`make_signals`, each row with its own patch grid in ``Signals.grids``
  (images of different sizes, as adapters give them).
- :func:`clustered_signals`: tokens drawn from a few centres, with exact duplicates (ties in every score).
- :func:`signals_for`: only the fields a stage or pipeline ``requires`` (plus ``visual`` / ``visual_mask``), so
  a stage that reads an undeclared field fails loudly instead of passing by accident.
- :func:`make_video_signals`: video rows (``frames`` / ``frame_index``) with static backgrounds, a moving
  region, scene cuts, optional near-ties and newline tokens, as temporal methods meet them.
- :func:`grid_for`, :func:`trim_row`, :func:`pad_signals`: the helpers the contract check uses.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from vtprune.framework import Signals

__all__ = [
    "PER_TOKEN_AXIS",
    "clustered_signals",
    "grid_for",
    "make_signals",
    "make_video_signals",
    "pad_signals",
    "ragged_signals",
    "signals_for",
    "trim_row",
]

#: Per-token `Signals` fields and the axis that indexes visual tokens.
PER_TOKEN_AXIS: dict[str, int] = {
    "visual": 1,
    "visual_mask": 1,
    "visual_keys": 1,
    "clip_visual": 1,
    "attention": 2,
    "cls_attention": 2,
    "frame_index": 1,
    "frame_span": 1,
    "prompt_attention": 3,
    "visual_attention": 3,
}
#: Per-token fields with a second visual-token axis (rows as well as columns), trimmed and padded on both.
SECOND_TOKEN_AXIS: dict[str, int] = {"visual_attention": 2}
#: Fields that come with another field (a mask with its tensor).
_COMPANIONS: dict[str, tuple[str, ...]] = {"prompt": ("prompt_mask",), "clip_text": ("clip_text_mask",)}


def make_signals(
    lengths: Sequence[int],
    dim: int = 8,
    prompt_len: int = 5,
    seed: int = 0,
    heads: int = 2,
    grid: Optional[tuple[int, int]] = None,
    key_dim: int = 4,
    clip_dim: int = 6,
    clip_text_len: int = 3,
) -> Signals:
    """Random signals with every field set; row b has ``lengths[b]`` real tokens (rest padding).

    With the defaults the tensors are bit-identical to the historical ``tests/conftest.make_signals`` (same
    generator, same draw order), so seeded tests keep their numbers. ``grid`` is stored as ``Signals.grid``.
    """
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 0:
        raise ValueError(f"lengths must be a non-empty list of non-negative token counts, got {lengths}")
    generator = torch.Generator().manual_seed(seed)
    batch, tokens = len(lengths), max(lengths)
    visual = torch.randn(batch, tokens, dim, generator=generator)  # (B, N, D)
    valid = torch.arange(tokens).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)  # (B, N)
    attention = torch.softmax(torch.randn(batch, heads, tokens, generator=generator), dim=-1)  # (B, H, N)
    signals = Signals(
        visual=visual,
        visual_mask=valid,
        prompt=torch.randn(batch, prompt_len, dim, generator=generator),  # (B, T, D)
        prompt_mask=torch.ones(batch, prompt_len, dtype=torch.bool),  # (B, T)
        attention=attention,
        visual_keys=torch.randn(batch, tokens, heads, key_dim, generator=generator),  # (B, N, Hk, dk)
        prompt_keys=torch.randn(batch, prompt_len, heads, key_dim, generator=generator),  # (B, T, Hk, dk)
        clip_visual=torch.randn(batch, tokens, clip_dim, generator=generator),  # (B, N, C)
        clip_text=torch.randn(batch, clip_text_len, clip_dim, generator=generator),  # (B, M, C)
        clip_text_mask=torch.ones(batch, clip_text_len, dtype=torch.bool),  # (B, M)
        cls_attention=torch.softmax(torch.randn(batch, heads, tokens, generator=generator), dim=-1),  # (B, H, N)
        grid=grid,
    )
    # drawn last so that the fields above keep their historical numbers; rows over the real tokens only
    logits = torch.randn(batch, heads, prompt_len, tokens, generator=generator)  # (B, H, T, N)
    prompt_attention = torch.softmax(logits.masked_fill(~valid.view(batch, 1, 1, tokens), float("-inf")), dim=-1)
    # drawn after prompt_attention for the same reason; rows and columns over the real tokens only
    logits = torch.randn(batch, heads, tokens, tokens, generator=generator)  # (B, H, N, N)
    visual_attention = torch.softmax(logits.masked_fill(~valid.view(batch, 1, 1, tokens), float("-inf")), dim=-1)
    visual_attention = visual_attention.nan_to_num(0.0) * valid.view(batch, 1, tokens, 1)  # padded rows 0
    return dataclasses.replace(
        signals, prompt_attention=prompt_attention.nan_to_num(0.0), visual_attention=visual_attention
    )


def grid_for(tokens: int) -> Optional[tuple[int, int]]:
    """The most square (h, w) with ``h * w == tokens`` and h <= w (a prime count gives (1, tokens)); None for 0."""
    for h in range(int(tokens**0.5), 0, -1):
        if tokens % h == 0:
            return (h, tokens // h)
    return None


def ragged_signals(lengths: Sequence[int], seed: int = 0, **options) -> Signals:
    """:func:`make_signals` where each row carries its own grid in ``Signals.grids`` (``grid_for(lengths[b])``).

    When every row has the same length this is the shared-``grid`` form instead (``grids`` None), as an adapter
    gives a batch of same-size images. ``options`` go to :func:`make_signals`.
    """
    lengths = [int(n) for n in lengths]
    if len(set(lengths)) == 1:
        return make_signals(lengths, seed=seed, grid=grid_for(lengths[0]), **options)
    signals = make_signals(lengths, seed=seed, **options)
    grids = torch.tensor([grid_for(n) or (0, 0) for n in lengths], dtype=torch.long)  # (B, 2)
    return dataclasses.replace(signals, grids=grids)


def clustered_signals(
    lengths: Sequence[int], clusters: int = 3, seed: int = 0, noise: float = 0.0, **options
) -> Signals:
    """Signals whose visual tokens (and CLIP patches, keys, attention) repeat ``clusters`` distinct values per row.

    With ``noise=0`` many tokens are exact duplicates, so every similarity, norm or attention score ties: a stage
    must still pick exactly ``counts[b]`` unique real tokens and stay deterministic and batch-independent (ties
    broken by position, never by the batch). Rows keep their own grids as in :func:`ragged_signals`.
    """
    if clusters < 1:
        raise ValueError(f"clusters must be >= 1, got {clusters}")
    base = ragged_signals(lengths, seed=seed, **options)
    tokens = base.num_tokens
    generator = torch.Generator().manual_seed(seed + 7919)
    assign = torch.randint(0, clusters, (base.batch_size, tokens), generator=generator)  # (B, N)

    def repeat(value: Optional[Tensor], axis: int) -> Optional[Tensor]:
        if value is None:
            return None
        moved = value.movedim(axis, 1)  # (B, N, ...)
        centres = moved[:, :clusters]  # (B, C, ...)
        index = assign.clamp(max=centres.shape[1] - 1)
        index = index.view(*index.shape, *([1] * (moved.dim() - 2))).expand(-1, -1, *moved.shape[2:])
        out = centres.gather(1, index)  # (B, N, ...)
        if noise:
            out = out + noise * torch.randn(out.shape, generator=generator)
        return out.movedim(1, axis)

    values = {name: repeat(getattr(base, name), axis) for name, axis in PER_TOKEN_AXIS.items() if name != "visual_mask"}
    values["visual_attention"] = repeat(values["visual_attention"], SECOND_TOKEN_AXIS["visual_attention"])
    for name in ("attention", "cls_attention", "prompt_attention", "visual_attention"):
        values[name] = values[name] / values[name].sum(-1, keepdim=True).clamp(min=1e-12)  # still sums to one
    return dataclasses.replace(base, **values)


def signals_for(requires: Iterable[str], lengths: Sequence[int], seed: int = 0, ragged: bool = True, **options) -> Signals:
    """Signals with only the fields in ``requires`` (a stage's or pipeline's ``requires``) set, besides ``visual``,
    ``visual_mask`` and the layout (grids, frames); a mask comes with its tensor (``prompt`` brings ``prompt_mask``).

    ``requires`` may be a stage class or instance, a `Pipeline`, or an iterable of field names.
    """
    needed = set(getattr(requires, "requires", requires))
    for name, companions in _COMPANIONS.items():
        if name in needed:
            needed.update(companions)
    signals = ragged_signals(lengths, seed=seed, **options) if ragged else make_signals(lengths, seed=seed, **options)
    keep = {"visual", "visual_mask", "grid", "grids", "frames", "frame_index", "frame_span"} | needed  # layout always kept
    unknown = sorted(needed - {f.name for f in dataclasses.fields(Signals)})
    if unknown:
        raise ValueError(f"unknown Signals fields {unknown}; valid: {', '.join(f.name for f in dataclasses.fields(Signals))}")
    return dataclasses.replace(signals, **{f.name: None for f in dataclasses.fields(Signals) if f.name not in keep})


def trim_row(signals: Signals, row: int, length: int) -> Signals:
    """Row ``row`` alone, cut to its first ``length`` tokens in every per-token field, without ``visual_mask``
    (all real) and with its own grid as the shared ``grid`` (``grids`` None). What a row "really" is once padding
    is removed; a stage must select the same tokens from it as from the padded batch."""
    single = signals.row(row)
    values = {}
    for name, axis in PER_TOKEN_AXIS.items():
        value = getattr(single, name)
        if value is not None and name != "visual_mask":
            values[name] = value.narrow(axis, 0, length)
            if name in SECOND_TOKEN_AXIS:
                values[name] = values[name].narrow(SECOND_TOKEN_AXIS[name], 0, length)
    own = signals.row_grids()[row]
    grid = own if own is not None and own[0] * own[1] == length else None
    return dataclasses.replace(single, visual_mask=None, grids=None, grid=grid, **values)


def pad_signals(signals: Signals, extra: int, seed: int = 0, scale: float = 1e3) -> Signals:
    """``signals`` with ``extra`` more padding tokens appended to every row, holding large random values
    (``scale``) that would win any score if a stage looked at them. Grids move to per-row ``grids`` so every row
    keeps its grid. A stage must select exactly the same tokens from the result."""
    if extra <= 0:
        return signals
    generator = torch.Generator().manual_seed(seed + 104729)
    values = {}
    for name, axis in PER_TOKEN_AXIS.items():
        value = getattr(signals, name)
        if name == "visual_mask":
            value = signals.valid()
        if value is None:
            continue
        shape = list(value.shape)
        shape[axis] = extra
        if value.dtype == torch.bool:
            filler = torch.zeros(shape, dtype=torch.bool)
        elif not value.is_floating_point():  # frame_index / frame_span: padding is outside every frame
            filler = torch.full(shape, -1, dtype=value.dtype)
        else:
            filler = (scale * torch.rand(shape, generator=generator)).to(value.dtype)
        values[name] = torch.cat([value, filler], dim=axis)
        if name in SECOND_TOKEN_AXIS:  # padded query rows as well
            second = SECOND_TOKEN_AXIS[name]
            shape = list(values[name].shape)
            shape[second] = extra
            filler = (scale * torch.rand(shape, generator=generator)).to(value.dtype)
            values[name] = torch.cat([values[name], filler], dim=second)
    grids = torch.tensor([g or (0, 0) for g in signals.row_grids()], dtype=torch.long)  # (B, 2)
    has_grid = bool((grids.prod(-1) > 0).any())
    return dataclasses.replace(signals, grid=None, grids=grids if has_grid else None, **values)


def make_video_signals(
    frames: Sequence[tuple[int, int, int]],
    dim: int = 16,
    prompt_len: int = 5,
    seed: int = 0,
    cuts: Sequence[Sequence[int]] = (),
    newlines: str = "none",
    noise: float = 0.05,
    near_ties: bool = False,
) -> Signals:
    """Seeded video rows for temporal stages: row b is a (T, H, W) = ``frames[b]`` video, frame-major.

    Each scene has a static background (one random (H, W, D) map, repeated over its frames plus ``noise``) and
    one moving square region (2x2 patches, new random values, shifted one patch right per frame). ``cuts[b]``
    lists the frames where row b starts a new scene (fresh background). ``near_ties`` makes the background
    exactly static (no noise), so frame similarities tie. ``newlines``: ``"none"``, ``"frame"`` (one newline
    token after every frame, as some layouts do) or ``"video"`` (one after the last frame, LLaVA-OneVision's
    video layout); newline tokens have ``frame_index`` -1. Rows are padded to the longest (``visual_mask``).
    Prompt tokens are random, in the same space.
    """
    generator = torch.Generator().manual_seed(seed)
    rows, indices = [], []
    for b, (t_len, h, w) in enumerate(frames):
        starts = {0, *[int(c) for c in (cuts[b] if b < len(cuts) else ())]}
        newline = torch.randn(1, dim, generator=generator)  # (1, D)
        tokens, index = [], []
        background = None
        for t in range(t_len):
            if t in starts or background is None:
                background = torch.randn(h, w, dim, generator=generator)  # (H, W, D)
            frame = background.clone()
            if not near_ties:
                frame = frame + noise * torch.randn(h, w, dim, generator=generator)
            size = min(2, h, w)
            left = t % max(w - size + 1, 1)
            frame[:size, left : left + size] = torch.randn(size, size, dim, generator=generator)
            tokens.append(frame.reshape(h * w, dim))  # (H*W, D)
            index.append(torch.full((h * w,), t, dtype=torch.long))
            if newlines == "frame" or (newlines == "video" and t == t_len - 1):
                tokens.append(newline)
                index.append(torch.full((1,), -1, dtype=torch.long))
            elif newlines not in ("none", "frame", "video"):
                raise ValueError(f"newlines must be one of 'none', 'frame', 'video', got {newlines!r}")
        rows.append(torch.cat(tokens))  # (n_b, D)
        indices.append(torch.cat(index))  # (n_b,)
    longest = max(row.shape[0] for row in rows)
    batch = len(rows)
    visual = torch.zeros(batch, longest, dim)  # (B, N, D)
    frame_index = torch.full((batch, longest), -1, dtype=torch.long)  # (B, N)
    mask = torch.zeros(batch, longest, dtype=torch.bool)  # (B, N)
    for b, (row, index) in enumerate(zip(rows, indices)):
        visual[b, : row.shape[0]] = row
        frame_index[b, : row.shape[0]] = index
        mask[b, : row.shape[0]] = True
    prompt = torch.randn(batch, prompt_len, dim, generator=generator)  # (B, T, D)
    return Signals(
        visual=visual,
        visual_mask=None if bool(mask.all()) else mask,
        prompt=prompt,
        prompt_mask=torch.ones(batch, prompt_len, dtype=torch.bool),
        frames=torch.tensor([list(f) for f in frames], dtype=torch.long),  # (B, 3)
        frame_index=frame_index,
        frame_span=torch.stack([frame_index, frame_index], dim=-1),  # (B, N, 2): nothing merged yet
    )
