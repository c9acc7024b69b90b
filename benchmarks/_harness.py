"""Shared benchmark helpers: 7B-shaped model slices, timers, peak memory, KV-cache bytes.

Not part of the package: imported by the scripts in this folder.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

#: Published dimensions of the models the paper evaluates (from their Hugging Face configs).
#: Only the layer count is cut, so one slice fits a CPU machine; everything else is the real shape.
PROFILES: dict[str, dict] = {
    "llava-1.5-7b": {
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        "text": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
        "source": "llava-hf/llava-1.5-7b-hf",
    },
    "qwen2.5-vl-7b": {
        "family": "qwen2_5_vl",
        "vision": dict(hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=112, in_channels=3, tokens_per_second=2,
                       hidden_act="silu"),
        "text": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                     vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
        "ids": dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653),
        "image_size": 672,  # 48 x 48 patches -> 24 x 24 = 576 merged tokens, LLaVA-1.5's count
        "source": "Qwen/Qwen2.5-VL-7B-Instruct",
    },
    "tiny-qwen": {
        "family": "qwen2_5_vl",
        "vision": dict(hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=56, in_channels=3, tokens_per_second=2),
        "text": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                     max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        "ids": dict(image_token_id=511, video_token_id=510, vision_start_token_id=509, vision_end_token_id=508),
        "image_size": 112,
        "source": "test profile",
    },
    # Same code path at toy sizes, for the scripts' own tests (never a reported figure).
    "tiny": {
        "vision": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32),
        "text": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024, rms_norm_eps=1e-5),
        "source": "test profile",
    },
}


@dataclass
class Slice:
    model: torch.nn.Module
    config: object
    image_tokens: int
    device: torch.device
    dtype: torch.dtype
    family: str = "llava"
    patch_grid: tuple[int, int] = (0, 0)  # Qwen: (H, W) in vision patches


def build_slice(
    profile: str, text_layers: int, vision_layers: int, device: str, dtype: torch.dtype, seed: int = 0, image_size: int | None = None
) -> Slice:
    """The profile's model family (LLaVA or Qwen2.5-VL) with its real shape and ``text_layers`` decoder layers."""
    if PROFILES[profile].get("family", "llava") == "qwen2_5_vl":
        return build_qwen_slice(profile, text_layers, vision_layers, device, dtype, seed, image_size)
    return build_llava_slice(profile, text_layers, vision_layers, device, dtype, seed, image_size)


def batch_inputs(slice_: Slice, batch: int, text_before: int = 8, question: int = 32, seed: int = 0) -> dict:
    """``batch`` prompts of [text, image, question] for the slice's family."""
    if slice_.family == "qwen2_5_vl":
        return qwen_batch(slice_, batch, text_before, question, seed)
    return llava_batch(slice_, batch, text_before, question, seed)


def build_qwen_slice(
    profile: str, text_layers: int, vision_layers: int, device: str, dtype: torch.dtype, seed: int = 0, image_size: int | None = None
) -> Slice:
    """A `Qwen2_5_VLForConditionalGeneration` with the profile's shape, ``text_layers`` decoder layers and
    ``vision_layers`` vision blocks (the last one full attention, the others windowed, as in the real tower)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    spec = PROFILES[profile]
    vision = dict(spec["vision"], depth=vision_layers, fullatt_block_indexes=[vision_layers - 1])
    size = image_size or spec["image_size"]
    unit = vision["patch_size"] * vision["spatial_merge_size"]
    if size % unit:
        raise ValueError(f"{profile}: image size {size} must be a multiple of patch x merge = {unit}")
    side = size // vision["patch_size"]
    image_tokens = (side // vision["spatial_merge_size"]) ** 2
    text = dict(spec["text"], num_hidden_layers=text_layers,
                max_position_embeddings=max(spec["text"]["max_position_embeddings"], image_tokens + 256))
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **spec["ids"])
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config)
    model = model.to(dtype=dtype).eval()
    return Slice(model, config, image_tokens, torch.device(device), dtype, family="qwen2_5_vl", patch_grid=(side, side))


def qwen_batch(slice_: Slice, batch: int, text_before: int = 8, question: int = 32, seed: int = 0) -> dict:
    """``batch`` chat-like prompts ``text <|vision_start|> <|image_pad|> x N <|vision_end|> question`` with random
    patches (the processor's flattened layout: (patches, C * T * P * P)) and their ``image_grid_thw``."""
    generator = torch.Generator().manual_seed(seed)
    config = slice_.config
    vocab = config.text_config.vocab_size
    special = min(config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id)
    vision = config.vision_config
    rows = []
    for _ in range(batch):
        before = torch.randint(3, min(vocab, special), (text_before,), generator=generator)
        after = torch.randint(3, min(vocab, special), (question,), generator=generator)
        image = torch.full((slice_.image_tokens,), config.image_token_id)
        rows.append(torch.cat([before, torch.tensor([config.vision_start_token_id]), image,
                               torch.tensor([config.vision_end_token_id]), after]))
    input_ids = torch.stack(rows).to(slice_.device)
    h, w = slice_.patch_grid
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.randn(batch * h * w, width, generator=generator)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == config.image_token_id).int(),
        "pixel_values": pixels.to(slice_.device, slice_.dtype),
        "image_grid_thw": torch.tensor([[1, h, w]] * batch, device=slice_.device),
    }


def build_llava_slice(
    profile: str, text_layers: int, vision_layers: int, device: str, dtype: torch.dtype, seed: int = 0, image_size: int | None = None
) -> Slice:
    """A `LlavaForConditionalGeneration` with a real 7B shape and ``text_layers`` decoder layers.

    ``image_size`` overrides the tower's input size (e.g. 756 px -> 54 x 54 = 2916 visual tokens, the
    scale of LLaVA-NeXT's 2880) to measure larger token counts with the same shapes."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    spec = PROFILES[profile]
    vision_spec = dict(spec["vision"], **({"image_size": image_size} if image_size else {}))
    vision = CLIPVisionConfig(num_hidden_layers=vision_layers, **vision_spec)
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    text_spec = dict(spec["text"], max_position_embeddings=max(spec["text"]["max_position_embeddings"], image_tokens + 256))
    text = LlamaConfig(num_hidden_layers=text_layers, **text_spec)
    image_token_id = text.vocab_size - 1
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id, vision_feature_layer=-1)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    model = model.to(dtype=dtype).eval()
    return Slice(model, config, image_tokens, torch.device(device), dtype)


def llava_batch(slice_: Slice, batch: int, text_before: int = 8, question: int = 32, seed: int = 0) -> dict:
    """``batch`` prompts of [text, image tokens, question] with random pixels."""
    generator = torch.Generator().manual_seed(seed)
    vocab = slice_.config.text_config.vocab_size
    vision = slice_.config.vision_config
    ids = []
    for _ in range(batch):
        before = torch.randint(3, vocab - 2, (text_before,), generator=generator)
        after = torch.randint(3, vocab - 2, (question,), generator=generator)
        image = torch.full((slice_.image_tokens,), slice_.config.image_token_id)
        ids.append(torch.cat([before, image, after]))
    input_ids = torch.stack(ids).to(slice_.device)
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=generator)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixels.to(slice_.device, slice_.dtype),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(function: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``function`` (CUDA events on a GPU, perf_counter otherwise)."""
    for _ in range(warmup):
        function()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            function()
            samples.append(time.perf_counter() - begin)
    return statistics.median(samples)


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Peak memory of the block in bytes: CUDA allocator peak, or the process's peak RSS growth on CPU
    (Linux: VmHWM reset through /proc/self/clear_refs)."""
    result: dict = {"bytes": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["bytes"] = torch.cuda.max_memory_allocated(device) - base
        return
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        base = _rss_bytes("VmRSS")
    except OSError:
        yield result
        return
    yield result
    result["bytes"] = _rss_bytes("VmHWM") - base


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(field)


def output_cache(output: object) -> object:
    """The KV cache of a model output (``cache`` in transformers 5, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def cache_bytes(cache: object) -> int:
    """Bytes held by a transformers cache (keys and values of every layer)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
