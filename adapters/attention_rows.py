"""Recompute one query token's attention row (and the keys) of a decoder layer, as eager attention does, so
scoring works under ``sdpa`` / flash attention."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from .decoder_spec import DecoderSpec, _to_additive, gather_seq

__all__ = ["recompute_attention_row", "recompute_attention_rows"]


def recompute_attention_row(
    layer: nn.Module,
    spec: DecoderSpec,
    hidden: Tensor,
    attention_mask: Any,
    position_embeddings: tuple[Tensor, Tensor],
    query_slot: Tensor,
    *,
    want_keys: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """The softmax attention row of one query token per batch row, as eager attention computes it.

    Args:
        layer: the decoder layer whose attention is recomputed.
        hidden: (B, L, D) the layer's input hidden states (before ``input_norm``).
        attention_mask: what the layer received (4-D bool or additive, or None = plain causal).
        position_embeddings: ``(cos, sin)`` the layer received.
        query_slot: (B,) slot of the query token in each row.
        want_keys: also return the post-RoPE keys.

    Returns:
        ``attention`` (B, H, L) fp32 (softmax in fp32, not cast back), ``keys`` (B, L, Hk, dk) or None.
    """
    attn = spec.attention(layer)
    normed = spec.input_norm(layer)(hidden)
    batch, length, _ = normed.shape
    head_dim = attn.head_dim
    row = gather_seq(normed, query_slot.view(batch, 1), 1)  # (B, 1, D)
    query = attn.q_proj(row).view(batch, 1, -1, head_dim)
    key = attn.k_proj(normed).view(batch, length, -1, head_dim)
    if getattr(attn, "q_norm", None) is not None:
        query = attn.q_norm(query)
    if getattr(attn, "k_norm", None) is not None:
        key = attn.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)  # (B, H, 1, d), (B, Hk, L, d)
    cos, sin = position_embeddings
    cos_q = gather_seq(cos, query_slot.view(batch, 1), spec.pe_seq_dim)
    sin_q = gather_seq(sin, query_slot.view(batch, 1), spec.pe_seq_dim)
    query = spec.apply_rope(query, query, cos_q, sin_q)[0]
    key = spec.apply_rope(key, key, cos, sin)[1]
    groups = query.shape[1] // key.shape[1]
    expanded = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    scores = torch.matmul(query, expanded.transpose(2, 3)) * attn.scaling  # (B, H, 1, L)
    if attention_mask is None:
        allowed = torch.arange(length, device=hidden.device).unsqueeze(0) <= query_slot.view(batch, 1)
        scores = scores + _to_additive(allowed.view(batch, 1, 1, length), scores.dtype)
    else:
        mask = attention_mask
        if not isinstance(mask, Tensor):
            raise TypeError(f"cannot recompute attention under a {type(mask).__name__} mask")
        if mask.shape[-2] == 1:
            mask_row = mask
        else:
            mask = mask.expand(batch, *mask.shape[1:])
            rows = torch.arange(batch, device=mask.device)
            mask_row = mask[rows, :, query_slot.to(mask.device), :].unsqueeze(2)  # (B, 1 or H, 1, KV)
        scores = scores + _to_additive(mask_row[..., -length:], scores.dtype)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)[:, :, 0]  # (B, H, L)
    keys = key.transpose(1, 2) if want_keys else None
    return probs, keys


def recompute_attention_rows(
    layer: nn.Module,
    spec: DecoderSpec,
    hidden: Tensor,
    attention_mask: Any,
    position_embeddings: tuple[Tensor, Tensor],
    query_slots: Tensor,
    *,
    plain_keys: Optional[Tensor] = None,
) -> Tensor:
    """`recompute_attention_row` for several query tokens per batch row (SparseVLM's prompt rows).

    Args:
        query_slots: (B, Q) long, the slots of the query tokens of each row (pad a short row by repeating a slot).
        plain_keys: None (the eager attention), or (B, L) bool, the real slots: then the rows are
            ``softmax(q k^T * scaling)`` of the layer's projections *before* RoPE over every real slot (no causal
            mask; PruneVid's official score), the layer's mask and ``position_embeddings`` unused.
        The other arguments are those of `recompute_attention_row`.
    Returns: (B, H, Q, L) fp32 softmax attention rows, as eager attention computes them (or the plain rows).
    """
    attn = spec.attention(layer)
    normed = spec.input_norm(layer)(hidden)
    batch, length, _ = normed.shape
    rows_q = query_slots.shape[1]
    head_dim = attn.head_dim
    rows = gather_seq(normed, query_slots, 1)  # (B, Q, D)
    query = attn.q_proj(rows).view(batch, rows_q, -1, head_dim)
    key = attn.k_proj(normed).view(batch, length, -1, head_dim)
    if getattr(attn, "q_norm", None) is not None:
        query = attn.q_norm(query)
    if getattr(attn, "k_norm", None) is not None:
        key = attn.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)  # (B, H, Q, d), (B, Hk, L, d)
    if plain_keys is None:
        cos, sin = position_embeddings
        cos_q = gather_seq(cos, query_slots, spec.pe_seq_dim)
        sin_q = gather_seq(sin, query_slots, spec.pe_seq_dim)
        query = spec.apply_rope(query, query, cos_q, sin_q)[0]
        key = spec.apply_rope(key, key, cos, sin)[1]
    groups = query.shape[1] // key.shape[1]
    expanded = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    scores = torch.matmul(query, expanded.transpose(2, 3)) * attn.scaling  # (B, H, Q, L)
    if plain_keys is not None:
        scores = scores + _to_additive(plain_keys.view(batch, 1, 1, length), scores.dtype)  # real slots only
    elif attention_mask is None:
        allowed = torch.arange(length, device=hidden.device).view(1, 1, length) <= query_slots.unsqueeze(-1)  # (B, Q, L)
        scores = scores + _to_additive(allowed.unsqueeze(1), scores.dtype)
    else:
        mask = attention_mask
        if not isinstance(mask, Tensor):
            raise TypeError(f"cannot recompute attention under a {type(mask).__name__} mask")
        if mask.shape[-2] == 1:
            mask_rows = mask
        else:
            mask = mask.expand(batch, *mask.shape[1:])
            index = torch.arange(batch, device=mask.device).unsqueeze(1)  # (B, 1)
            mask_rows = mask[index, :, query_slots.to(mask.device), :].permute(0, 2, 1, 3)  # (B, 1 or H, Q, KV)
        scores = scores + _to_additive(mask_rows[..., -length:], scores.dtype)
    return torch.softmax(scores, dim=-1, dtype=torch.float32)  # (B, H, Q, L)
