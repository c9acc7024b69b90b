"""Shared fixtures: the registry, seeded signal builders."""

from __future__ import annotations

import pytest
import torch

from vtprune.framework import Signals, build_registry


@pytest.fixture(scope="session")
def registry():
    """The built-in registry, without third-party entry points (reproducible)."""
    return build_registry(autoload=False)


def make_signals(
    lengths: list[int],
    dim: int = 8,
    prompt_len: int = 5,
    seed: int = 0,
    heads: int = 2,
    grid: tuple[int, int] | None = None,
) -> Signals:
    """Random signals with every field set; row b has ``lengths[b]`` real tokens (rest padding)."""
    generator = torch.Generator().manual_seed(seed)
    batch, tokens = len(lengths), max(lengths)
    visual = torch.randn(batch, tokens, dim, generator=generator)
    valid = torch.arange(tokens).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    attention = torch.softmax(torch.randn(batch, heads, tokens, generator=generator), dim=-1)
    return Signals(
        visual=visual,
        visual_mask=valid,
        prompt=torch.randn(batch, prompt_len, dim, generator=generator),
        prompt_mask=torch.ones(batch, prompt_len, dtype=torch.bool),
        attention=attention,
        visual_keys=torch.randn(batch, tokens, heads, 4, generator=generator),
        prompt_keys=torch.randn(batch, prompt_len, heads, 4, generator=generator),
        clip_visual=torch.randn(batch, tokens, 6, generator=generator),
        clip_text=torch.randn(batch, 3, 6, generator=generator),
        clip_text_mask=torch.ones(batch, 3, dtype=torch.bool),
        cls_attention=torch.softmax(torch.randn(batch, heads, tokens, generator=generator), dim=-1),
        grid=grid,
    )
