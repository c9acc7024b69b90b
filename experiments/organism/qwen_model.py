"""Architecture of the Qwen2-VL model organism: a tiny, standard ``Qwen2VLForConditionalGeneration``.

Contract
--------
``build_qwen_model(spec, seed)`` returns a freshly initialised transformers Qwen2-VL: the Qwen2-VL vision
transformer (14 px patches, temporal patch 2, 2-D rotary, ``spatial_merge_size`` 2 and its ``PatchMerger``
MLP that maps each 2 x 2 group of patches into the text width) and a Qwen2 text model with M-RoPE
(``mrope_section`` splits the rotary frequencies of a head into temporal / height / width parts) over the
organism vocabulary (``qwen_processor.qwen_vocabulary``). Each ``QWEN_IMAGE_SIZE`` image gives 16 x 16 patches
-> 8 x 8 = ``QWEN_IMAGE_TOKENS`` merged visual tokens, row-major, one per ``PATCH`` x ``PATCH`` patch of the
scene (the order of ``Sample.patch_labels``).

``init_text_from_llava(model, llava_dir)`` copies the shipped LLaVA organism's text model (same widths:
Llama and Qwen2 decoder layers differ only by Qwen2's q/k/v biases, which stay zero) and the word embeddings
of the ids both vocabularies share; the vision tower and merger stay random. Training starts from it (the
text model already answers from visual tokens aligned with its word embeddings), which cut the training time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from .processor import SPECIAL_TOKENS
from .qwen_processor import (
    IMAGE_PAD, QWEN_MERGE, QWEN_PATCH, QWEN_TEMPORAL_PATCH, VIDEO_PAD, VISION_END, VISION_START, qwen_vocabulary,
)

__all__ = ["QwenSpec", "build_qwen_config", "build_qwen_model", "init_text_from_llava", "mrope_section"]

# rotary frequencies of a head (head_dim / 2) split temporal : height : width like Qwen2-VL's 16 : 24 : 24
_MROPE_PARTS = (2, 3, 3)
ROPE_THETA = 10000.0  # the LLaVA organism's Llama default, so its text weights transfer


@dataclass
class QwenSpec:
    """Widths and depths of the Qwen2-VL organism (defaults = the shipped model)."""

    vision_hidden: int = 64
    vision_layers: int = 1
    vision_heads: int = 2
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    mlp_ratio: int = 4
    init_from_llava: bool = True

    def to_dict(self) -> dict[str, int | bool]:
        """Plain-dict view (for logs and checkpoints)."""
        return asdict(self)


def mrope_section(head_dim: int) -> list[int]:
    """Temporal / height / width rotary sections of a head (sum = ``head_dim // 2``), in ``_MROPE_PARTS`` ratio."""
    half = head_dim // 2
    unit, rest = divmod(half, sum(_MROPE_PARTS))
    if unit == 0:
        raise ValueError(f"head_dim {head_dim} is too small for M-RoPE sections {_MROPE_PARTS}")
    parts = [p * unit for p in _MROPE_PARTS]
    parts[0] += rest
    return parts


def build_qwen_config(spec: QwenSpec) -> Qwen2VLConfig:
    """The ``Qwen2VLConfig`` for ``spec``."""
    vocab = qwen_vocabulary()
    ids = {tok: i for i, tok in enumerate(vocab)}
    head_dim = spec.text_hidden // spec.text_heads
    text = dict(
        vocab_size=len(vocab),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_hidden * spec.mlp_ratio,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "mrope_section": mrope_section(head_dim), "rope_theta": ROPE_THETA},
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
    )
    vision = dict(
        depth=spec.vision_layers,
        embed_dim=spec.vision_hidden,
        hidden_size=spec.text_hidden,
        num_heads=spec.vision_heads,
        mlp_ratio=spec.mlp_ratio,
        patch_size=QWEN_PATCH,
        spatial_merge_size=QWEN_MERGE,
        temporal_patch_size=QWEN_TEMPORAL_PATCH,
        in_channels=3,
    )
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=True,
    )
    config.pad_token_id = ids["<pad>"]
    return config


def build_qwen_model(spec: QwenSpec, seed: int = 0) -> Qwen2VLForConditionalGeneration:
    """A freshly initialised Qwen2-VL organism (deterministic given ``seed``), in eval mode."""
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(build_qwen_config(spec))
    gen = model.generation_config
    gen.pad_token_id = SPECIAL_TOKENS.index("<pad>")
    gen.bos_token_id = SPECIAL_TOKENS.index("<s>")
    gen.eos_token_id = SPECIAL_TOKENS.index("</s>")
    gen.do_sample = False
    gen.max_new_tokens = 2
    return model.eval()


@torch.no_grad()
def init_text_from_llava(model: Qwen2VLForConditionalGeneration, llava_dir: str | Path) -> list[str]:
    """Copy the LLaVA organism's text model into ``model`` where names and shapes match; returns the copied keys.

    Embedding rows are copied for the ids both vocabularies share (the LLaVA vocabulary is a prefix of
    ``qwen_vocabulary()``). Raises ``ValueError`` if no decoder weight matched (wrong widths).
    """
    from . import load_organism

    llava, _ = load_organism(path=llava_dir)  # transformers' own key conversion for this version
    source = llava.state_dict()
    prefix = "model.language_model."
    target = model.state_dict()
    copied: list[str] = []
    for key, value in source.items():
        if not key.startswith(prefix) or key not in target:
            continue
        dest = target[key]
        if key.endswith("embed_tokens.weight"):
            n = min(value.shape[0], dest.shape[0])
            dest[:n].copy_(value[:n].to(dest.dtype))
        elif dest.shape == value.shape:
            dest.copy_(value.to(dest.dtype))
        else:
            continue
        copied.append(key)
        if key.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            target[key[: -len("weight")] + "bias"].zero_()  # Llama has no q/k/v bias: same function
    if not any(".layers." in k for k in copied):
        raise ValueError(f"no LLaVA organism text weights in {llava_dir} match the Qwen2-VL organism's shapes")
    return copied
