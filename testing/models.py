"""Tiny random VLMs and their inputs for adapter tests (real transformers classes, CPU, fp32, built in seconds).

Nothing is downloaded: each factory builds a ``*ForConditionalGeneration`` from a tiny config with random weights
(seeded) in eval mode. Each ``*_batch(model, samples)`` builds a left-padded batch of the numbered test samples:
sample i is always the same prompt and images, whichever batch it is in, so ``batch(model, [i])`` is sample i alone
(what :func:`vtprune.testing.check_adapter` compares each batch row with).

- LLaVA-1.5: :func:`tiny_llava` + :func:`llava_batch` (CLIP tower, 16 tokens per image, Llama decoder, GQA 4/2);
- LLaVA-NeXT: :func:`tiny_llava_next` + :func:`llava_next_batch` (AnyRes crops, image-newline tokens);
- Qwen2-VL: :func:`tiny_qwen2_vl` + :func:`qwen2_vl_batch` (M-RoPE, merged patches, per-image grids).

transformers is imported inside the functions.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = [
    "llava_batch",
    "llava_next_batch",
    "qwen2_vl_batch",
    "finish_tiny",
    "tiny_clip_config",
    "tiny_llama_config",
    "tiny_llava",
    "tiny_llava_next",
    "tiny_qwen2_vl",
    "tiny_text_values",
    "tiny_vision_values",
]

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
LLAVA_VOCAB, LLAVA_IMAGE_ID = 96, 95
IMAGE_SIZE, PATCH_SIZE = 28, 7  # 4 x 4 = 16 patches per crop
#: (images, question tokens) of LLaVA sample i (cycled): one image, then two.
LLAVA_SAMPLES: tuple[tuple[int, int], ...] = ((1, 5), (2, 3), (1, 4))
#: (height, width) of the images of LLaVA-NeXT sample i (cycled): AnyRes grids of different shapes.
LLAVA_NEXT_SAMPLES: tuple[tuple[tuple[int, int], ...], ...] = (((30, 50),), ((56, 28),), ((28, 28), (50, 30)))
QWEN_VOCAB = 64
QWEN_PAD, QWEN_END, QWEN_TURN = 0, 1, 2
QWEN_VISION_START, QWEN_VISION_END, QWEN_IMAGE, QWEN_VIDEO = 60, 61, 62, 63
QWEN_MERGE, QWEN_PATCH, QWEN_TEMPORAL, QWEN_CHANNELS = 2, 2, 2, 3
#: Merged (h, w) grids of the images of Qwen2-VL sample i (cycled).
QWEN_SAMPLES: tuple[tuple[tuple[int, int], ...], ...] = (((2, 3),), ((3, 3), (1, 2)), ((2, 2),))


def finish_tiny(model: Any, attn: str, pad: int, dtype: torch.dtype = torch.float32) -> Any:
    """Set the attention implementation and dtype, eval mode, and a generation config that never stops early
    (random tiny models emit EOS at once) and pads with ``pad``."""
    model.set_attn_implementation(attn)
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = None  # random tiny models emit EOS early
    model.generation_config.pad_token_id = pad
    return model


def tiny_text_values(**overrides: Any) -> dict:
    """Keyword arguments of the tiny decoders' configs (Llama, Qwen2): 4 layers of width 64, GQA 4/2."""
    values = dict(
        vocab_size=LLAVA_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    values.update(overrides)
    return values


def tiny_vision_values(**overrides: Any) -> dict:
    """Keyword arguments of the tiny vision towers' configs (CLIP, SigLIP): 2 layers of width 32, 4 x 4 patches."""
    values = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
    )
    values.update(overrides)
    return values


def tiny_clip_config(**overrides: Any) -> Any:
    """A tiny ``CLIPVisionConfig`` (16 patches per 28 x 28 image)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**tiny_vision_values(**{"projection_dim": 32, **overrides}))


def tiny_llama_config(**overrides: Any) -> Any:
    """A tiny ``LlamaConfig`` (`tiny_text_values`)."""
    from transformers import LlamaConfig

    return LlamaConfig(**tiny_text_values(**overrides))


def tiny_llava(seed: int = 0, layers: int = 4, attn: str = "sdpa", dtype: torch.dtype = torch.float32, **text: Any) -> Any:
    """A random ``LlavaForConditionalGeneration``: CLIP tower (16 tokens per image), Llama decoder (GQA 4/2)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=tiny_clip_config(),
        text_config=tiny_llama_config(num_hidden_layers=layers, **text),
        image_token_id=LLAVA_IMAGE_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    return finish_tiny(LlavaForConditionalGeneration(config), attn, PAD_ID, dtype)


def tiny_llava_next(seed: int = 0, layers: int = 4, attn: str = "sdpa", dtype: torch.dtype = torch.float32, **text: Any) -> Any:
    """A random ``LlavaNextForConditionalGeneration`` with AnyRes pinpoints 28x56, 56x28, 56x56."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(
        vision_config=tiny_clip_config(),
        text_config=tiny_llama_config(num_hidden_layers=layers, **text),
        image_token_id=LLAVA_IMAGE_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE], [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]],
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    return finish_tiny(LlavaNextForConditionalGeneration(config), attn, PAD_ID, dtype)


def _left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, L), left padded."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(list(row))
        mask[i, width - len(row) :] = 1
    return ids, mask


def _llava_prompt(sample: int, tokens_per_image: Sequence[int], question: int) -> list[int]:
    generator = torch.Generator().manual_seed(sample)
    row = [BOS_ID] + torch.randint(3, 40, (3,), generator=generator).tolist()  # system prefix
    for i, count in enumerate(tokens_per_image):
        row += [LLAVA_IMAGE_ID] * count + [10 + i]  # image, then a "\n"-like separator
    row += torch.randint(3, 90, (question,), generator=generator).tolist()
    return row + [41, 42]  # "ASSISTANT:" marker


def _with_positions(ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """Inputs with the position ids ``generate`` would use (cumsum of the mask - 1), so a left-padded row sees the
    same positions as the sample alone."""
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (B, L)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def llava_batch(model: Any, samples: Sequence[int]) -> dict:
    """Left-padded inputs of the LLaVA test ``samples`` (indices into ``LLAVA_SAMPLES``, cycled)."""
    size = model.config.vision_config.image_size
    tokens = (size // model.config.vision_config.patch_size) ** 2
    rows, pixels = [], []
    for sample in samples:
        images, question = LLAVA_SAMPLES[sample % len(LLAVA_SAMPLES)]
        rows.append(_llava_prompt(sample, [tokens] * images, question))
        generator = torch.Generator().manual_seed(1000 + sample)
        pixels.append(torch.randn(images, 3, size, size, generator=generator))  # (n, 3, S, S)
    ids, mask = _left_pad(rows, PAD_ID)
    return {**_with_positions(ids, mask), "pixel_values": torch.cat(pixels).to(model.dtype)}


def llava_next_batch(model: Any, samples: Sequence[int]) -> dict:
    """Left-padded inputs of the LLaVA-NeXT test ``samples`` (indices into ``LLAVA_NEXT_SAMPLES``, cycled); the
    placeholder counts come from the model's own ``get_image_features``."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    size = config.vision_config.image_size
    sizes, pixels = [], []
    for sample in samples:
        generator = torch.Generator().manual_seed(1000 + sample)
        for height, width in LLAVA_NEXT_SAMPLES[sample % len(LLAVA_NEXT_SAMPLES)]:
            crops = image_size_to_num_patches([height, width], config.image_grid_pinpoints, size)
            sizes.append((height, width))
            pixels.append(torch.randn(crops, 3, size, size, generator=generator))  # (crops, 3, S, S)
    width = max(p.shape[0] for p in pixels)
    pixel_values = torch.zeros(len(pixels), width, 3, size, size)  # (n, C, 3, S, S)
    for i, p in enumerate(pixels):
        pixel_values[i, : p.shape[0]] = p
    image_sizes = torch.tensor(sizes, dtype=torch.long)  # (n, 2)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values.to(model.dtype), image_sizes).pooler_output
    counts = [int(f.shape[0]) for f in features]
    rows, k = [], 0
    for i, sample in enumerate(samples):
        n = len(LLAVA_NEXT_SAMPLES[sample % len(LLAVA_NEXT_SAMPLES)])
        rows.append(_llava_prompt(sample, counts[k : k + n], 3 + sample % 3))
        k += n
    ids, mask = _left_pad(rows, PAD_ID)
    return {**_with_positions(ids, mask), "pixel_values": pixel_values.to(model.dtype), "image_sizes": image_sizes}


def tiny_qwen2_vl(seed: int = 0, layers: int = 3, attn: str = "sdpa") -> Any:
    """A random ``Qwen2VLForConditionalGeneration``: 4 heads (GQA 4/2) of 8 dims, M-RoPE sections (2, 1, 1),
    a 2-block vision tower with 2 x 2 patch merging."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(
        vocab_size=QWEN_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
        eos_token_id=QWEN_END, pad_token_id=QWEN_PAD, bos_token_id=None,
    )
    vision = dict(
        depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=QWEN_PATCH,
        spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL, in_channels=QWEN_CHANNELS,
    )
    config = Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO,
        vision_start_token_id=QWEN_VISION_START, vision_end_token_id=QWEN_VISION_END,
    )
    torch.manual_seed(seed)
    return finish_tiny(Qwen2VLForConditionalGeneration(config), attn, QWEN_PAD)


def qwen2_vl_batch(model: Any, samples: Sequence[int]) -> dict:
    """Left-padded chat-template-like inputs of the Qwen2-VL test ``samples`` (indices into ``QWEN_SAMPLES``)."""
    rows, pixels, grids = [], [], []
    width = QWEN_CHANNELS * QWEN_TEMPORAL * QWEN_PATCH * QWEN_PATCH
    for sample in samples:
        images = QWEN_SAMPLES[sample % len(QWEN_SAMPLES)]
        row = [QWEN_TURN, 5, 6, QWEN_END, QWEN_TURN, 7]  # system turn, then "<|im_start|>user"
        generator = torch.Generator().manual_seed(1000 + sample)
        for h, w in images:
            row += [QWEN_VISION_START] + [QWEN_IMAGE] * (h * w) + [QWEN_VISION_END]
            pixels.append(torch.randn(h * w * QWEN_MERGE * QWEN_MERGE, width, generator=generator))  # (patches, C)
            grids.append((1, h * QWEN_MERGE, w * QWEN_MERGE))
        row += [20 + sample % 10, 21, 22][: 2 + sample % 2] + [QWEN_END, QWEN_TURN, 8]  # question, "assistant"
        rows.append(row)
    ids, mask = _left_pad(rows, QWEN_PAD)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == QWEN_IMAGE).int(),
        "pixel_values": torch.cat(pixels).to(model.dtype),
        "image_grid_thw": torch.tensor(grids),
    }
