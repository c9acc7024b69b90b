"""The video profile of ``benchmarks/selection.py`` (issue 15): video `Signals` at LLaVA-OneVision-7B /
LLaVA-Video-7B size, the presets that run on them, and the 7B-shaped prefill of the unpruned sequence.

Not part of the package.

- `video_signals`: B rows of T frames x (side x side) tokens plus the layout's one newline (LLaVA-OneVision's
  video layout), D = the Qwen2-7B width, from ``vtprune.testing.make_video_signals`` (static backgrounds, a moving
  region, a scene cut at T / 2), with every other signal the video adapter fills at ``pre_llm`` / ``layer`` drops
  (``attention`` over the 7B model's heads, ``visual_keys`` / ``prompt_keys`` over its key heads).
- `video_presets`: every registered preset whose pipeline the LLaVA-OneVision adapter supports (the one support
  check, ``framework.support.support_problems``): the registry is iterated, no name is hard-coded, so presets
  registered later (the temporal ones) are picked up.
- `text_prefill_seconds`: the measured CPU time of the profile's decoder (``layers`` Qwen2-7B-shaped layers, the
  LLM of LLaVA-OneVision-7B) over the unpruned sequence (visual tokens + the benchmark's text tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vtprune.adapters.llava_onevision import LlavaOnevisionAdapter
from vtprune.framework import Signals, compose
from vtprune.framework.support import support_problems
from vtprune.testing import make_video_signals

from _gpu_estimate import TEXT_TOKENS
from _harness import PROFILES
from _harness import time_call as time_device

__all__ = ["VIDEO_ADAPTER", "VIDEO_PREFILL_PROFILES", "video_signals", "video_presets", "text_prefill_seconds"]

#: The adapter whose signals the video profile stands for (32 frames x 196 tokens: LLaVA-OneVision's video layout).
VIDEO_ADAPTER = LlavaOnevisionAdapter
#: Profiles whose text model is the 7B video LLM's shape (Qwen2-7B: D = 3584, 28 heads, 4 key heads) or a toy one.
VIDEO_PREFILL_PROFILES = ("qwen2.5-vl-7b", "tiny-qwen")


def video_signals(batch: int, frames: int, side: int, dim: int, heads: int, key_heads: int, *, prompt_tokens: int = 32,
                  device: str = "cpu", seed: int = 0) -> Signals:
    """B video rows of ``frames`` x (``side`` x ``side``) tokens and one trailing newline (``frame_index`` -1), with
    ``attention`` (B, heads, N) softmax rows and ``visual_keys`` / ``prompt_keys`` (B, N / T, key_heads, dim / heads)."""
    base = make_video_signals([(frames, side, side)] * batch, dim=dim, prompt_len=prompt_tokens, seed=seed,
                              cuts=[[frames // 2]] * batch, newlines="video")
    generator = torch.Generator().manual_seed(seed + 1)
    tokens = base.num_tokens
    head_dim = max(1, dim // heads)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    signals = dataclasses.replace(
        base,
        attention=torch.softmax(normal(batch, heads, tokens), dim=-1),  # (B, H, N)
        visual_keys=normal(batch, tokens, key_heads, head_dim),  # (B, N, Hk, dk)
        prompt_keys=normal(batch, prompt_tokens, key_heads, head_dim),  # (B, T, Hk, dk)
    )
    moved = {f.name: getattr(signals, f.name).to(device) for f in dataclasses.fields(signals)
             if isinstance(getattr(signals, f.name), torch.Tensor)}
    return dataclasses.replace(signals, **moved)


def video_presets(registry: Any) -> list[tuple[str, bool]]:
    """(name, reads frames) of every preset of ``registry`` that `VIDEO_ADAPTER` supports, in registry order."""
    out = []
    for name in registry.presets:
        pipeline = compose(name, registry=registry)
        if not support_problems(VIDEO_ADAPTER, pipeline):
            out.append((name, bool({"frames", "frame_index"} & (pipeline.requires | pipeline.optional))))
    return out


def text_prefill_seconds(tokens: int, batch: int, layers: int, profile: str, device: str = "cpu") -> dict:
    """Seconds of one unpruned prefill (after one warm-up) of ``layers`` decoder layers with the text shape of
    ``profile`` (a Qwen2 decoder: LLaVA-OneVision's LLM) over ``tokens`` visual + the benchmark's text tokens."""
    from transformers import Qwen2Config, Qwen2Model

    text = {k: v for k, v in PROFILES[profile]["text"].items() if k not in ("rope_parameters",)}
    theta = PROFILES[profile]["text"].get("rope_parameters", {}).get("rope_theta", 10000.0)
    length = tokens + TEXT_TOKENS
    config = Qwen2Config(**dict(text, num_hidden_layers=layers, max_position_embeddings=max(length, 4096)),
                         rope_parameters={"rope_type": "default", "rope_theta": theta})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2Model(config).to(device).eval()
    embeds = torch.randn(batch, length, config.hidden_size, device=device)  # (B, L, D)

    def run() -> None:
        with torch.no_grad():
            model(inputs_embeds=embeds, use_cache=False)

    seconds = time_device(run, torch.device(device), repeats=1, warmup=1)
    return {"seconds": seconds, "sequence": length, "layers": layers, "profile": profile}
