"""The peers' selection steps as their official code executes them, for ``benchmarks/official.py``.

Not the official files (we do not vendor them: licences, and their modules import whole model stacks):
each function below is our own step-by-step transcription of the official selection, op for op in the
official order, dtype and layout, from the tensors the official code holds at that point to the kept
indices it produces. The commit, file and lines are cited in each docstring (the same commits as
docs/methods.md). Used for timing only; ``official.py`` checks that every transcription keeps exactly
the tokens vtprune keeps on the same inputs, and fails loudly if not.

Sequence layout of the LLaVA-1.5 branches: ``sys`` system-prompt tokens, then the ``N`` image tokens,
then the text; ``sys = 35`` in FastV's, DivPrune's, DART's and FitPrune's LLaVA-1.5 settings.

VTW (lzhxmu/VTW @ a3d8cfc3) has no selection step to transcribe: it withdraws every visual token after a fixed
layer (no ranking), so there is nothing of it to time against vtprune's ``select``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "fastv_official",
    "cdpruner_official",
    "divprune_official",
    "visionzip_official",
    "vispruner_official",
    "dart_official",
    "prumerge_official",
    "gprune_official",
    "fitprune_official",
]


def fastv_official(attention: Tensor, sys_length: int, image_length: int, rank: int) -> Tensor:
    """FastV, pkunlp-icler/FastV @ d1659729, ``src/transformers/src/transformers/models/llama/modeling_llama.py``
    lines 736-750 (``LlamaModel.forward``, ``USE_FAST_V and FASTV_INPLACE``, ``idx == AGG_LAYER``).

    Args:
        attention: (1, H, Q, S) the attention weights layer K-1 returned (``layer_outputs[1]``); the official
            input is the whole map (Q = S), only its last query row is read.
        sys_length, image_length, rank: ``SYS_LENGTH``, ``IMAGE_TOKEN_LENGTH``, ``ATTENTION_RANK``.
    Returns: (S - image_length + rank,) long ``keep_indexs``: every non-image position and the kept image ones, sorted.
    """
    seq_length = attention.shape[-1]
    device = attention.device
    average = torch.mean(attention, dim=1)[0]  # (Q, S): head mean of the whole map, batch 0
    last = average[-1]  # (S,): the last token's row
    image = last[sys_length : sys_length + image_length]  # (N,)
    top = image.topk(rank).indices + sys_length  # (rank,)
    keep = torch.cat(
        (torch.arange(sys_length, device=device), top, torch.arange(sys_length + image_length, seq_length, device=device))
    )
    return keep.sort().values


def cdpruner_official(image_features: Tensor, image_embeds: Tensor, text_embeds: Tensor, visual_token_num: int) -> Tensor:
    """CDPruner, Theia-4869/CDPruner @ 9541616c, ``llava/model/llava_arch.py`` lines 144-187 (``encode_images``
    after the projector): cosine kernel, negated CLIP relevance min-max normalised over the batch tensor,
    conditional kernel, greedy fast MAP (``torch.arange(B)`` advanced indexing in every step, as written).

    Args:
        image_features: (B, N, D) post-projector features; image_embeds: (B, N, C) CLIP image embeddings;
        text_embeds: (M, C) CLIP text embeddings; visual_token_num: T.
    Returns: (B, N) bool ``index_masks``.
    """
    B, N, _ = image_features.shape
    device = image_features.device
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)  # (B, N, D)
    image_normalized = image_normalized.float()
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))  # (B, N, N)
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)  # (B, N, C)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)  # (M, C)
    relevance = torch.matmul(image_embeds, text_embeds.t())  # (B, N, M)
    relevance = (-relevance).mean(dim=-1)  # (B, N)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())  # (B, N)
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)  # (B, N, N)
    cis = torch.zeros((visual_token_num, B, N), device=device)  # (T, B, N)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # (B, N)
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long, device=device)  # (T, B)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum("tb,tbn->bn", cis[:i, torch.arange(B), j], cis[:i])) / torch.sqrt(
            di2s[torch.arange(B), j]
        ).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float("inf")
    select_idx = torch.sort(select_idx.t()).values  # (B, T)
    index_masks = torch.zeros(B, N, dtype=torch.bool, device=device)
    index_masks.scatter_(1, select_idx, True)
    return index_masks


def divprune_official(new_input_embeds: Tensor, sys_length: int, image_length: int, threshold_ratio: float) -> Tensor:
    """DivPrune, vbdi/divprune @ 799e2d95, ``LLaVA/llava/model/llava_arch.py`` lines 374-379 (the caller in
    ``prepare_inputs_labels_for_multimodal``, ``LAYER_INDEX=0``) and 147-171 (``pairwise_cosine_similarity``,
    ``DivPrune`` with ``cosine_matrix=None``).

    Args:
        new_input_embeds: (1, S, D) the input embeddings; sys_length: ``SYS_TOKEN_LEN``; image_length:
            ``img_feature_len``; threshold_ratio: ``SUBSET_RATIO``.
    Returns: (S - N + round(ratio * N),) long ``keep_indexs``, sorted.
    """
    visual_tokens = new_input_embeds[0][sys_length : sys_length + image_length]  # (N, D)
    threshold_terms = int(round(threshold_ratio * visual_tokens.shape[0]))
    norm_matrix = visual_tokens / visual_tokens.norm(dim=1, keepdim=True)
    cosine_matrix = 1.0 - torch.mm(norm_matrix, norm_matrix.t())  # (N, N)
    s = torch.empty(threshold_terms, dtype=torch.long, device=visual_tokens.device)
    for i in range(threshold_terms):
        if i == 0:
            m2 = cosine_matrix
        else:
            m2 = torch.index_select(cosine_matrix, 0, torch.index_select(s, 0, torch.arange(0, i, device=cosine_matrix.device)))
        if i == 0:
            scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(m2, dim=0).values
        phrase_to_add_idx = torch.argmax(scores)
        s[i] = phrase_to_add_idx
    s += sys_length
    device = new_input_embeds.device
    keep = torch.cat(
        (torch.arange(sys_length, device=device), s, torch.arange(sys_length + image_length, new_input_embeds.shape[1], device=device))
    )
    return keep.sort().values


def visionzip_official(
    attn_weights: Tensor, hidden_states: Tensor, key_states: Tensor, dominant_num: int, contextual_num: int
) -> tuple[Tensor, Tensor]:
    """VisionZip, dvlab-research/VisionZip @ 3151f6df: ``visionzip/utils.py`` ``CLIPAttention_forward`` (``metric =
    key_states.mean(1)``, computed only for this selection) and ``visionzip/clip_encoder.py`` lines 50-85
    (``CLIPVisionTower_VisionZip.forward`` after the tower).

    Args:
        attn_weights: (B, H, N + 1, N + 1) the penultimate layer's attention map (CLS first);
        hidden_states: (B, N + 1, D) its hidden states; key_states: (B, Hk, N + 1, dk) its raw key states;
        dominant_num, contextual_num: ``_info["dominant"]`` (patches, CLS kept besides) and ``_info["contextual"]``.
    Returns: ``hidden_states_save`` (B, 1 + dominant + contextual, D) and ``all_indices`` (B, 1 + dominant).
    """
    metric = key_states.mean(1)  # (B, N + 1, dk)
    cls_idx = 0
    cls_attention = attn_weights[:, :, cls_idx, cls_idx + 1 :]
    cls_attention_sum = cls_attention.sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat(
        [torch.zeros((hidden_states.shape[0], 1), dtype=topk_indices.dtype, device=topk_indices.device), topk_indices], dim=1
    )
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool, device=metric.device).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(hidden_states.shape[0], dominant_num + 1, hidden_states.shape[2])
    metric_filtered = metric[mask].view(hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(
        hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), hidden_states.shape[2]
    )
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step, device=metric_normalized.device)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    tokens_to_merge = metric_normalized[
        :, ~torch.isin(torch.arange(metric_normalized.shape[1], device=metric_normalized.device), target_indices), :
    ]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(
        tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num, dtype=hidden_states_filtered.dtype, device=metric_normalized.device
    )
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[
        :, ~torch.isin(torch.arange(hidden_states_filtered.shape[1], device=hidden_states_filtered.device), target_indices), :
    ]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_states_filtered[:, target_indices, :]
    contextual_tokens = target_hidden + aggregated_hidden
    hidden_states_save = torch.cat([dominant_tokens, contextual_tokens], dim=1).to(hidden_states.dtype)
    return hidden_states_save, all_indices


def vispruner_official(image_features: Tensor, image_attentions: Tensor, visual_token_num: int, important_ratio: float) -> Tensor:
    """VisPruner, Theia-4869/VisPruner @ aefa01ad, ``llava/model/llava_arch.py`` lines 144-183 (``encode_images``
    before the projector).

    Args:
        image_features: (B, N, C) CLIP patch features; image_attentions: (B, H, N) CLS attention;
        visual_token_num: T; important_ratio: r.
    Returns: (B, N) bool ``index_masks``.
    """
    B, N, C = image_features.shape
    device = image_features.device
    important_token_num = int(visual_token_num * important_ratio)
    diverse_token_num = visual_token_num - important_token_num
    image_attentions = image_attentions.mean(dim=1)  # (B, N)
    token_indices = image_attentions.argsort(dim=-1, descending=True)  # (B, N)
    important_indices = token_indices[:, :important_token_num]
    residual_indices = token_indices[:, important_token_num:]
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)  # (B, N, C)
    while diverse_token_num > 0:
        R = residual_indices.shape[1]
        r = min(8, R - diverse_token_num)
        if r <= 0:
            break
        residual_tokens = image_normalized[torch.arange(B).unsqueeze(-1).expand(-1, R), residual_indices]  # (B, R, C)
        a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        scores = scores.max(dim=-1).values
        distinct_indices = scores.argsort(dim=-1, descending=True)[:, r:]
        residual_indices = torch.cat(
            [residual_indices[..., ::2][torch.arange(B).unsqueeze(-1).expand(-1, R // 2 - r), distinct_indices], residual_indices[..., 1::2]],
            dim=-1,
        )
    if diverse_token_num > 0:
        selected_indices = torch.cat([important_indices, residual_indices], dim=-1)
    else:
        selected_indices = important_indices
    index_masks = torch.zeros(B, N, dtype=torch.bool, device=device)
    index_masks.scatter_(1, selected_indices, True)
    return index_masks


def dart_official(
    last_layer_state: Tensor,
    any_states: Tensor,
    image_token_start_index: int,
    image_token_length: int,
    max_num_trunction: int,
    pivot_image_token: int = 4,
    pivot_text_token: int = 4,
) -> Tensor:
    """DART, ZichenWen1/DART (fork xqy1111111/DART @ 5a19452f), ``llava/model/language_model/modeling_llama_self.py``
    lines 397-449 (``DART.get_retained_image_token``, LLaVA-1.5 branch: ``config.text_length`` None).

    Args:
        last_layer_state: (1, S, D) ``model.norm`` of layer K-1's output; any_states: (1, Hk, S, dk) its key states;
        the rest: the ``DART_config`` entries.
    Returns: (kept,) long absolute positions of the retained image tokens, in Python-set order.
    """
    token_topk = math.ceil(max_num_trunction // (pivot_image_token + pivot_text_token))
    device = last_layer_state.device
    any_states = any_states.permute(0, 2, 1, 3).reshape(any_states.shape[0], any_states.shape[2], -1)
    k_states_image_token = any_states[0][image_token_start_index : image_token_start_index + image_token_length, :]
    k_states_query_token = any_states[0][image_token_start_index + image_token_length :, :]
    k_states_image_token_l1_norm = torch.norm(k_states_image_token, p=1, dim=-1)
    k_states_query_token_l1_norm = torch.norm(k_states_query_token, p=1, dim=-1)
    image_indices = (k_states_image_token_l1_norm.topk(pivot_image_token).indices + image_token_start_index).tolist()
    query_indices = (
        k_states_query_token_l1_norm.topk(pivot_text_token).indices + image_token_start_index + image_token_length
    ).tolist()
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(image_token_start_index, image_token_start_index + image_token_length)) - set(image_indices)
    valid_indices_list = list(valid_indices)
    for item in list(indices_set):
        valid_vectors = last_layer_state[0][valid_indices_list, :]
        cos_sim = -F.cosine_similarity(last_layer_state[0][item, :], valid_vectors, dim=-1)
        top_k_indices = cos_sim.topk(token_topk).indices
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
        valid_indices_list = list(valid_indices)
    indices_set.difference_update(query_indices)
    return torch.tensor(list(indices_set), device=device)


def prumerge_official(image_features: Tensor, cls_attn: Tensor, desired_layer_k: Tensor, plus: bool) -> Tensor:
    """LLaVA-PruMerge / PruMerge+, 42Shawn/LLaVA-PruMerge @ 097c0411, ``llava/model/multimodal_encoder/clip_encoder.py``:
    ``CLIPVisionTower.token_prune_merge_advanced`` lines 114-170 (PruMerge) and ``token_prune_merge_advanced_plus``
    lines 203-280 (PruMerge+, the one ``forward`` calls), ``if_adaptive=True``, with ``outlier_dectection`` (lines
    34-46, NumPy percentiles on the host) and ``complement_idx`` (lines 12-25) inlined; from the CLS row onwards.
    The upper bound is formed in float64 as NumPy 1.x (the official environment) promotes ``np.float32 + 1.5 *
    np.float32``; NumPy 2 keeps float32. The ``.to(device=self.device)`` calls (no-ops on the CPU) are left out.

    Args:
        image_features: (B, N, C) the penultimate CLIP features (``feature_select``);
        cls_attn: (B, N) ``attn[:, 0, 1:]``, the CLS row of the hooked layer's one-head attention;
        desired_layer_k: (B, N + 1, C) the hooked ``k_proj`` output (CLS first);
        plus: PruMerge+ (its spatial samples; the official ``575`` is ``N - 1``).
    Returns: ``(updated, idx)``: (B, L + 1, C) the merged kept tokens in the official order then the extra token,
        and (B, L) their positions.
    """
    B, N, C = image_features.shape
    # outlier_dectection: on the host, in NumPy
    attn_np = cls_attn.to(dtype=torch.float32).cpu().numpy().flatten()
    Q1 = np.percentile(attn_np, 25)
    Q3 = np.percentile(attn_np, 75)
    IQR = Q3 - Q1
    upper_bound = np.float64(Q3) + 1.5 * np.float64(IQR)  # NumPy 1.x's promotion (the official torch 2.0.1 stack)
    outlier_indices = np.where((attn_np > upper_bound))[0]
    reduction_ratio = len(outlier_indices) / len(attn_np)
    _, idx = torch.topk(cls_attn, int(N * reduction_ratio), dim=1, largest=True)  # (B, k)
    if plus:
        step_length = int(1 / reduction_ratio)
        arithmetic_sequence = torch.arange(0, N - 1, int(step_length / 3))
        original_tensor_1d = idx.flatten()
        filtered_sequence = torch.tensor([x for x in arithmetic_sequence if x not in original_tensor_1d])
        idx = torch.cat((idx, filtered_sequence.unsqueeze(0)), dim=1)  # (B, L)
    index = idx.unsqueeze(-1).expand(-1, -1, C)  # (B, L, C)
    Key_wo_cls = desired_layer_k[:, 1:]  # (B, N, C)
    x_others = torch.gather(image_features, dim=1, index=index)
    x_others_attn = torch.gather(cls_attn, dim=1, index=idx)
    Key_others = torch.gather(Key_wo_cls, dim=1, index=index)
    # complement_idx(idx, N)
    a = torch.arange(N, device=idx.device)
    a = a.unsqueeze(0).expand(idx.shape[0], -1)
    masked = torch.scatter(a, -1, idx, 0)
    compl, _ = torch.sort(masked, dim=-1, descending=False)
    compl = compl.permute(-1, 0)
    compl = compl[idx.shape[-1] :].permute(1, 0)  # (B, N - L)
    non_topk = torch.gather(image_features, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))
    non_topk_Key = torch.gather(Key_wo_cls, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))
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
            rest_x_others_attn = torch.cat([before_i_x_others_attn, after_i_x_others_attn, non_topk_attn[b, :].unsqueeze(0)], dim=1)
            rest_Keys = torch.cat([before_i_Key, after_i_Key, non_topk_Key_norm[b, :, :].unsqueeze(0)], dim=1)
            cos_sim_matrix = torch.bmm(key_others_norm, rest_Keys.transpose(1, 2))  # (1, 1, N - 1)
            _, cluster_indices = torch.topk(cos_sim_matrix, k=int(32), dim=2, largest=True)
            cluster_tokens = rest_x_others[:, cluster_indices.squeeze(), :]  # (1, 32, C)
            weights = rest_x_others_attn[:, cluster_indices.squeeze()].unsqueeze(-1)
            weighted_avg = torch.sum(cluster_tokens * weights, dim=1)
            if plus:
                updated_center = x_others[b, i, :] + weighted_avg
            else:
                updated_center = weighted_avg + x_others[b, i, :]
            updated_x_others[b, i, :] = updated_center
    extra_one_token = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True)  # (B, 1, C)
    updated_x_others = torch.cat([updated_x_others, extra_one_token], dim=1)
    return updated_x_others, idx


def gprune_official(image_feature: Tensor, count: int, similarity: float = 0.5, temperature: float = 0.03,
                    iterate_num: int = 5) -> Tensor:
    """G-Prune, jytmelon/G-Prune @ 762c6377, ``LLaVA-NeXT/llava/model/llava_arch.py`` lines 252-287
    (``prepare_inputs_labels_for_multimodal`` after ``encode_images``), the base-image graph (``A1``) on all n
    tokens it is given. The official code builds its two graphs (base image, high-resolution grid) one after the
    other, each a single (n, n) matrix for the batch of one: nothing is batched across images or samples.

    Args:
        image_feature: (n, D) the projected visual tokens of the graph (the model dtype; float32 here);
        count: ``int(keep_ratio * 576)`` (official ``keep_ratio = 0.5``); the rest: the official constants.
    Returns: (count,) long kept positions, ascending (``image_keep_indices`` without the other graph's and the
        row-end tokens).
    """
    n = image_feature.shape[0]
    image_token_index1 = torch.arange(0, n, device=image_feature.device)
    image1_feature_normalized = torch.nn.functional.normalize(image_feature[image_token_index1], p=2, dim=1)  # (n, D)
    A1 = image1_feature_normalized @ image1_feature_normalized.t()  # (n, n)
    A1[A1 < similarity] = 0
    A1 = A1 / temperature
    A1[abs(A1) < 1e-6] = -5000
    A1 = torch.nn.functional.softmax(A1, dim=1)
    Degree1 = torch.sum(A1 > 0, dim=1)
    A1 = torch.matrix_power(A1, iterate_num)
    W1 = torch.norm(image_feature[image_token_index1], dim=-1).view(1, -1).to(dtype=A1.dtype)  # (1, n)
    result1 = W1 @ A1
    result1 = result1 / Degree1
    keep_indices1 = result1.topk(count).indices
    keep_indices1 = image_token_index1[keep_indices1]
    keep_indices1 = keep_indices1.flatten()
    return torch.sort(keep_indices1)[0]


def fitprune_official(attn_weights: Tensor, sys_length: int, left_vtoken_num: int, deletions: int) -> Tensor:
    """FitPrune, ywh187/FitPrune @ d28e418c, ``LLaVA_1.5/llava/model/language_model/modeling_llama.py`` lines
    392-402 (``LlamaAttention.forward``, the "fitprune" block at a layer with ``delete_scheme[layer_idx] != 0``):
    head max, self and cross weights, ascending sort, the keep mask ``topk_idx``. The deletion itself (line 405,
    ``attn_output[:, :, topk_idx, :]``, and the decoder layer's residual slice) is model work on both sides.

    Args:
        attn_weights: (1, H, Q, S) layer l's softmax attention; the official map is the whole (1, H, S, S) one
            (``sys_length`` = 35); given its image and text rows over the image columns it is (1, H, N + T, N)
            with ``sys_length`` = 0.
        left_vtoken_num: the visual tokens present (N); deletions: ``delete_scheme[layer_idx]``.
    Returns: (S,) bool ``topk_idx`` (False at the deleted positions).
    """
    attn_weights_headmax = attn_weights.max(dim=1).values.squeeze()  # (Q, S)
    attn_self_attention = attn_weights_headmax[sys_length : sys_length + left_vtoken_num, sys_length : sys_length + left_vtoken_num] / left_vtoken_num
    attn_self_attention = attn_self_attention.sum(dim=0)  # (N,)
    attn_cross_attention = attn_weights_headmax[sys_length + left_vtoken_num :, sys_length : sys_length + left_vtoken_num].sum(dim=0)
    topk = torch.sort(attn_cross_attention * attn_self_attention, dim=-1).indices[:deletions]
    topk_idx = torch.ones(attn_weights.shape[3], dtype=torch.bool, device=attn_weights.device)
    topk_idx[topk + sys_length] = False
    return topk_idx
