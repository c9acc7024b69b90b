"""Analytic prefill FLOPs and KV-cache bytes of a decoder language model, from its config.

Plain functions of a transformers config and per-layer sequence lengths (token pruning inside the
language model makes the length differ by layer). Every size comes from the config: layers,
hidden size, attention heads, key/value heads (GQA), head dim, MLP width, vocabulary. For a VLM
config the text config is used (``config.get_text_config()``). Counted: the language model only
(the vision encoder and projector are the same with and without pre-LLM / in-LLM pruning).

Conventions (stated, so numbers can be compared): one multiply-add = 2 FLOPs; per layer with n
tokens, hidden d, H query heads, G key/value heads, head dim h, MLP width m:

- projections: ``2 n d (H h)`` (q) + ``2 * 2 n d (G h)`` (k, v) + ``2 n (H h) d`` (o);
- attention: ``2 n^2 H h`` (scores) + ``2 n^2 H h`` (weighted values); full square, or half of it with
  ``causal=True``;
- MLP: ``2 n d m`` per matrix, 3 matrices for gated MLPs (Llama, Mistral, Qwen), 2 otherwise;
- LM head: ``2 d V`` per position whose logits are computed (``lm_head_tokens``, 1 in generation);
- norms, rotary embeddings, softmax and activations are not counted.

KV cache: ``2 (K and V) * G * h * bytes`` per token per layer.

>>> from transformers import LlamaConfig
>>> config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
...                      num_key_value_heads=2, intermediate_size=128, vocab_size=100)
>>> prefill_flops(config, [10, 6], lm_head_tokens=0)
1214464
>>> kv_cache_bytes(config, [10, 6], bytes_per_value=2)
2048
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

__all__ = [
    "DecoderShape",
    "decoder_shape",
    "text_config",
    "layer_lengths",
    "layer_prefill_flops",
    "prefill_flops",
    "decode_flops",
    "kv_cache_bytes",
    "dtype_bytes",
]

#: Model types whose MLP has two matrices (up, down) instead of three (gate, up, down).
NON_GATED_MLP = frozenset({"gpt2", "gpt_neox", "gptj", "opt", "phi", "bloom", "falcon", "gpt_bigcode", "codegen", "clip_text_model"})


@dataclass(frozen=True)
class DecoderShape:
    """Sizes of a decoder stack, read from a config by `decoder_shape`."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    mlp_matrices: int


def text_config(config: Any) -> Any:
    """The language-model config of ``config`` (itself for a text-only model)."""
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        return getter()
    return getattr(config, "text_config", None) or config


def decoder_shape(config: Any, mlp_matrices: Optional[int] = None) -> DecoderShape:
    """The decoder sizes of a transformers config (VLM configs: their text config)."""
    text = text_config(config)
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    intermediate = int(getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None) or 4 * hidden)
    if mlp_matrices is None:
        mlp_matrices = 2 if getattr(text, "model_type", "") in NON_GATED_MLP else 3
    return DecoderShape(
        layers=int(text.num_hidden_layers),
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=intermediate,
        vocab=int(text.vocab_size),
        mlp_matrices=mlp_matrices,
    )


def layer_lengths(num_layers: int, total: int, visual: int, kept_from_layer: Mapping[int, int]) -> list[int]:
    """Sequence length seen by each decoder layer of one sample.

    Args:
        num_layers: decoder layers.
        total: prefill tokens before pruning (text + visual).
        visual: visual tokens before pruning.
        kept_from_layer: {layer k: visual tokens present from layer k on} (0 for pre-LLM / vision
            drops); layers before the first entry see every visual token.

    >>> layer_lengths(4, 100, 60, {2: 30})
    [100, 100, 70, 70]
    """
    lengths, present = [], visual
    for layer in range(num_layers):
        if layer in kept_from_layer:
            present = int(kept_from_layer[layer])
        lengths.append(total - visual + present)
    return lengths


def _per_layer(shape: DecoderShape, seq_lens: Union[int, Sequence[int]]) -> list[int]:
    if isinstance(seq_lens, int):
        return [seq_lens] * shape.layers
    lens = [int(n) for n in seq_lens]
    if len(lens) != shape.layers:
        raise ValueError(f"need one sequence length per decoder layer ({shape.layers}), got {len(lens)}")
    return lens


def layer_prefill_flops(shape: DecoderShape, n: int, causal: bool = False) -> int:
    """FLOPs of one decoder layer over n tokens (conventions in the module docstring)."""
    d, q_width, kv_width = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    projections = 2 * n * d * q_width + 2 * 2 * n * d * kv_width + 2 * n * q_width * d
    attention = 4 * n * n * q_width
    if causal:
        attention = 4 * (n * (n + 1) // 2) * q_width
    mlp = shape.mlp_matrices * 2 * n * d * shape.intermediate
    return projections + attention + mlp


def prefill_flops(
    config: Any,
    seq_lens: Union[int, Sequence[int]],
    *,
    causal: bool = False,
    lm_head_tokens: int = 1,
    mlp_matrices: Optional[int] = None,
) -> int:
    """Prefill FLOPs of the language model: ``seq_lens`` = tokens at each decoder layer (or one int
    for all layers)."""
    shape = decoder_shape(config, mlp_matrices)
    body = sum(layer_prefill_flops(shape, n, causal) for n in _per_layer(shape, seq_lens))
    return body + 2 * shape.hidden * shape.vocab * lm_head_tokens


def decode_flops(config: Any, context_lens: Union[int, Sequence[int]], mlp_matrices: Optional[int] = None) -> int:
    """FLOPs of one decode step (one new token) given the cached tokens at each layer."""
    shape = decoder_shape(config, mlp_matrices)
    d, q_width, kv_width = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    total = 0
    for n in _per_layer(shape, context_lens):
        total += 2 * d * q_width + 4 * d * kv_width + 2 * q_width * d
        total += 4 * (n + 1) * q_width
        total += shape.mlp_matrices * 2 * d * shape.intermediate
    return total + 2 * d * shape.vocab


def kv_cache_bytes(
    config: Any,
    seq_lens: Union[int, Sequence[int]],
    *,
    bytes_per_value: Optional[int] = None,
    new_tokens: int = 0,
) -> int:
    """KV-cache bytes after prefill (plus ``new_tokens`` decoded tokens) for one sample."""
    shape = decoder_shape(config)
    width = bytes_per_value if bytes_per_value is not None else dtype_bytes(config)
    tokens = sum(n + new_tokens for n in _per_layer(shape, seq_lens))
    return 2 * shape.kv_heads * shape.head_dim * width * tokens


def dtype_bytes(config: Any, default: int = 2) -> int:
    """Bytes per value of the config's dtype (``dtype`` / ``torch_dtype``), else ``default``."""
    import torch

    for source in (text_config(config), config):
        dtype = getattr(source, "dtype", None) if hasattr(source, "dtype") else getattr(source, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        if isinstance(dtype, torch.dtype):
            return torch.empty((), dtype=dtype).element_size()
    return default
