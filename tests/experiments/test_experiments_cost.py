"""Analytic prefill FLOPs and KV-cache bytes against hand computations."""

from __future__ import annotations

import pytest
from transformers import GPT2Config, LlamaConfig, LlavaConfig

from vtprune.experiments import cost


def gqa_config(**extra) -> LlamaConfig:
    # d = 64, H = 4 query heads of h = 16, G = 2 key/value heads, m = 128, V = 100
    return LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, vocab_size=100, **extra)


def hand_layer(n: int) -> int:
    q = 2 * n * 64 * 64
    kv = 2 * (2 * n * 64 * 32)  # GQA: k and v are 2 heads x 16 = 32 wide
    o = 2 * n * 64 * 64
    attention = 2 * n * n * 64 + 2 * n * n * 64
    mlp = 3 * 2 * n * 64 * 128  # gated: gate, up, down
    return q + kv + o + attention + mlp


def test_prefill_flops_by_hand() -> None:
    config = gqa_config()
    assert cost.prefill_flops(config, [10, 6], lm_head_tokens=0) == hand_layer(10) + hand_layer(6) == 1214464
    assert cost.prefill_flops(config, 10) == 2 * hand_layer(10) + 2 * 64 * 100
    causal = cost.prefill_flops(config, [4, 4], causal=True, lm_head_tokens=0)
    assert causal == 2 * (hand_layer(4) - 4 * 16 * 64 + 4 * 10 * 64)
    with pytest.raises(ValueError, match="one sequence length per decoder layer"):
        cost.prefill_flops(config, [1, 2, 3])


def test_kv_cache_bytes_by_hand_and_dtype() -> None:
    config = gqa_config()
    # per token per layer: K and V, 2 heads x 16 dims, 2 bytes
    assert cost.kv_cache_bytes(config, [10, 6], bytes_per_value=2) == 2 * 2 * 16 * 2 * 16
    assert cost.kv_cache_bytes(config, [10, 6], bytes_per_value=2, new_tokens=3) == 2 * 2 * 16 * 2 * 22
    assert cost.kv_cache_bytes(gqa_config(dtype="float32"), 5) == 2 * 2 * 16 * 4 * 10


def test_vlm_config_uses_its_text_config_and_non_gated_mlp() -> None:
    llava = LlavaConfig(text_config=gqa_config().to_dict())
    assert cost.decoder_shape(llava) == cost.decoder_shape(gqa_config())
    gpt2 = GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=10)
    shape = cost.decoder_shape(gpt2)
    assert (shape.mlp_matrices, shape.kv_heads, shape.head_dim, shape.intermediate) == (2, 4, 8, 128)


def test_layer_lengths_and_decode_flops() -> None:
    assert cost.layer_lengths(4, 100, 60, {}) == [100] * 4
    assert cost.layer_lengths(4, 100, 60, {0: 10}) == [50] * 4
    assert cost.layer_lengths(4, 100, 60, {1: 30, 3: 15}) == [100, 70, 70, 55]
    config = gqa_config()
    per_layer = 2 * 64 * 64 + 4 * 64 * 32 + 2 * 64 * 64 + 4 * 11 * 64 + 3 * 2 * 64 * 128
    assert cost.decode_flops(config, 10) == 2 * per_layer + 2 * 64 * 100
