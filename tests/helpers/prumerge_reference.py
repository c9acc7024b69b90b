"""Loop-style reference of LLaVA-PruMerge / PruMerge+, written without vtprune code.

It follows, op for op, github.com/42Shawn/LLaVA-PruMerge @ 097c04116a58465e4bcb58cec44a94018a68ff1a,
``llava/model/multimodal_encoder/clip_encoder.py``: ``outlier_dectection`` (NumPy percentiles), ``complement_idx``,
``CLIPVisionTower.token_prune_merge_advanced`` / ``token_prune_merge_advanced_plus`` (``if_adaptive=True``), on a
batch of ONE image (the official evaluation batch; the official PruMerge+ fails for two). Differences from the
official text, all forced by generality, none by convenience:

- ``575`` (the last sampled position bound of 576 patches) is written ``n - 1``;
- the outlier bound is formed in float64, as NumPy 1.x (the official environment: torch 2.0.1) promotes
  ``np.float32 + 1.5 * np.float32``; NumPy 2 would keep float32;
- ``topk(k=32)`` is ``min(32, n - 1)`` for the tiny test images.

:func:`official_prumerge` returns the official output sequence (kept tokens in the official order, then the extra
token); :func:`official_attention_and_keys` computes the official signals from a CLIP tower layer and its input.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["official_outlier_ratio", "official_prumerge", "official_attention_and_keys"]


def official_outlier_ratio(attn: Tensor) -> float:
    """``outlier_dectection``: the fraction of upper IQR outliers (NumPy 1.x float64 bound)."""
    attn_np = attn.to(dtype=torch.float32).cpu().numpy().flatten()
    q1 = np.percentile(attn_np, 25)
    q3 = np.percentile(attn_np, 75)
    iqr = q3 - q1
    upper_bound = np.float64(q3) + 1.5 * np.float64(iqr)
    outlier_indices = np.where((attn_np > upper_bound))[0]
    return len(outlier_indices) / len(attn_np)


def _complement_idx(idx: Tensor, dim: int) -> Tensor:
    """``complement_idx`` for a (1, k) index: the other positions of ``range(dim)``, ascending, (1, dim - k)."""
    a = torch.arange(dim, device=idx.device).unsqueeze(0).expand(1, -1)
    masked = torch.scatter(a, -1, idx, 0)
    compl, _ = torch.sort(masked, dim=-1, descending=False)
    return compl[:, idx.shape[-1] :]


def official_prumerge(image_features: Tensor, cls_attn: Tensor, key_wo_cls: Tensor, plus: bool) -> Tensor:
    """The official token reduction on one image.

    Args:
        image_features: (1, N, C) patch features; cls_attn: (1, N) CLS row of the full-width attention (CLS column
        removed); key_wo_cls: (1, N, C) full-width keys of the patches.
    Returns: ``(sequence, order)``: (1, L + 1, C) the updated kept tokens in the official order, then the extra
        token; (L,) the kept positions in that order.
    """
    B, N, C = image_features.shape
    reduction_ratio = official_outlier_ratio(cls_attn)
    _, idx = torch.topk(cls_attn, int(N * reduction_ratio), dim=1, largest=True)
    if plus:
        step_length = int(1 / reduction_ratio)
        arithmetic_sequence = torch.arange(0, N - 1, int(step_length / 3))
        original_tensor_1d = idx.flatten()
        filtered_sequence = torch.tensor([x for x in arithmetic_sequence if x not in original_tensor_1d], dtype=torch.long)
        idx = torch.cat((idx, filtered_sequence.unsqueeze(0)), dim=1)
    index = idx.unsqueeze(-1).expand(-1, -1, C)
    x_others = torch.gather(image_features, dim=1, index=index)
    x_others_attn = torch.gather(cls_attn, dim=1, index=idx)
    Key_others = torch.gather(key_wo_cls, dim=1, index=idx.unsqueeze(-1).expand(-1, -1, key_wo_cls.shape[-1]))
    compl = _complement_idx(idx, N)
    non_topk = torch.gather(image_features, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))
    non_topk_Key = torch.gather(key_wo_cls, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, key_wo_cls.shape[-1]))
    non_topk_attn = torch.gather(cls_attn, dim=1, index=compl)
    Key_others_norm = F.normalize(Key_others, p=2, dim=-1)
    non_topk_Key_norm = F.normalize(non_topk_Key, p=2, dim=-1)
    B, left_tokens, C = x_others.size()
    updated_x_others = torch.zeros_like(x_others)
    for b in range(B):
        for i in range(left_tokens):
            key_others_norm = Key_others_norm[b, i, :].unsqueeze(0).unsqueeze(0)
            before_i_Key = Key_others_norm[b, :i, :].unsqueeze(0)
            after_i_Key = Key_others_norm[b, i + 1 :, :].unsqueeze(0)
            before_i_x_others = x_others[b, :i, :].unsqueeze(0)
            after_i_x_others = x_others[b, i + 1 :, :].unsqueeze(0)
            rest_x_others = torch.cat([before_i_x_others, after_i_x_others, non_topk[b, :, :].unsqueeze(0)], dim=1)
            before_i_x_others_attn = x_others_attn[b, :i].unsqueeze(0)
            after_i_x_others_attn = x_others_attn[b, i + 1 :].unsqueeze(0)
            rest_x_others_attn = torch.cat(
                [before_i_x_others_attn, after_i_x_others_attn, non_topk_attn[b, :].unsqueeze(0)], dim=1
            )
            rest_Keys = torch.cat([before_i_Key, after_i_Key, non_topk_Key_norm[b, :, :].unsqueeze(0)], dim=1)
            cos_sim_matrix = torch.bmm(key_others_norm, rest_Keys.transpose(1, 2))
            _, cluster_indices = torch.topk(cos_sim_matrix, k=min(32, N - 1), dim=2, largest=True)
            cluster_tokens = rest_x_others[:, cluster_indices.view(-1), :]
            weights = rest_x_others_attn[:, cluster_indices.view(-1)].unsqueeze(-1)
            weighted_avg = torch.sum(cluster_tokens * weights, dim=1)
            updated_x_others[b, i, :] = x_others[b, i, :] + weighted_avg
    extra_one_token = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True)
    return torch.cat([updated_x_others, extra_one_token], dim=1), idx[0]


def official_attention_and_keys(layer: torch.nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """The official signals from a CLIP encoder layer (``layers[23]`` in the official code) and its input.

    The hooks there catch ``q_proj`` / ``k_proj`` outputs (on ``layer_norm1(hidden)``); ``attn = softmax(q k^T *
    C ** -0.5)`` with C the hidden size, one head. Returns ``cls_attn`` (crops, N) and ``Key_wo_cls`` (crops, N, C).
    """
    normed = layer.layer_norm1(hidden)
    desired_layer_q = layer.self_attn.q_proj(normed)
    desired_layer_k = layer.self_attn.k_proj(normed)
    C = hidden.shape[-1]
    attn = (desired_layer_q @ desired_layer_k.transpose(-2, -1)) * C**-0.5
    attn = F.softmax(attn, dim=-1)
    return attn[:, 0, 1:], desired_layer_k[:, 1:]
