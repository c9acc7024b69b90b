"""Architecture of the model organism: a tiny, standard ``LlavaForConditionalGeneration``.

Contract
--------
``build_model(spec)`` returns a freshly initialised transformers LLaVA: a CLIP vision
tower (``CLIPVisionConfig``, ``IMAGE_SIZE`` px images, ``PATCH`` px patches), the
standard LLaVA projector (Linear-GELU-Linear) and a Llama text model (``LlamaConfig``)
over the organism's word-level vocabulary. LLaVA-1.5 conventions: the last vision layer
(``vision_feature_layer=-1``, the tower is only a few layers deep) with the CLS token
dropped (``vision_feature_select_strategy="default"``), so each image contributes
``NUM_IMAGE_TOKENS`` visual tokens in patch (row-major) order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from .processor import IMAGE_TOKEN, NUM_IMAGE_TOKENS, SPECIAL_TOKENS
from .task import IMAGE_SIZE, PATCH, vocabulary


@dataclass
class ModelSpec:
    """Widths and depths of the organism (defaults = the shipped model)."""

    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    mlp_ratio: int = 4
    tie_embeddings: bool = True

    def to_dict(self) -> dict[str, int | bool]:
        """Plain-dict view (for logs and checkpoints)."""
        return asdict(self)


def vocab_size() -> int:
    """Number of tokens of the organism tokenizer (specials + task words)."""
    return len(SPECIAL_TOKENS) + len(vocabulary())


def build_config(spec: ModelSpec) -> LlavaConfig:
    """The ``LlavaConfig`` for ``spec``."""
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * spec.mlp_ratio,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=spec.vision_hidden,
        num_channels=3,
    )
    text = LlamaConfig(
        vocab_size=vocab_size(),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_hidden * spec.mlp_ratio,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=512,
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=SPECIAL_TOKENS.index("</s>"),
        tie_word_embeddings=spec.tie_embeddings,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=SPECIAL_TOKENS.index(IMAGE_TOKEN),
        image_seq_length=NUM_IMAGE_TOKENS,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=spec.tie_embeddings,
    )
    config.pad_token_id = SPECIAL_TOKENS.index("<pad>")
    return config


def build_model(spec: ModelSpec, seed: int = 0) -> LlavaForConditionalGeneration:
    """A freshly initialised organism (deterministic given ``seed``), in eval mode."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(spec))
    gen = model.generation_config
    gen.pad_token_id = SPECIAL_TOKENS.index("<pad>")
    gen.bos_token_id = SPECIAL_TOKENS.index("<s>")
    gen.eos_token_id = SPECIAL_TOKENS.index("</s>")
    gen.do_sample = False
    gen.max_new_tokens = 2
    return model.eval()


def n_parameters(model: torch.nn.Module) -> int:
    """Total number of parameters."""
    return sum(p.numel() for p in model.parameters())
