"""G-Prune as the official code runs it, one image at a time (test code only, never imported by the package).

Source: github.com/jytmelon/G-Prune @ 762c63771212104958ddbc508d0c421e95adafc9, ``LLaVA-NeXT/llava/model/llava_arch.py``,
``LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal``, the block after ``encode_images`` (base-image part:
``image1_feature_normalized`` ... ``keep_indices1``). Re-written in our own words with the official op order: normalise,
similarity matrix, cut below ``similarity``, divide by ``temperature``, give near-zero entries the logit -5000, row
softmax, degree = positive entries per row, ``matrix_power``, norms times the powered matrix, divided by the degree,
``topk(int(keep_ratio * n))``, ascending sort. The official code computes in the model dtype; these references run in
whatever dtype they are given (float32 in the tests).

`official_next_keep` is the whole LLaVA-NeXT block (the only path the official code has): the image's packed tokens are
the base image (``image1_token_length = 576`` = the tower's patches per crop) then ``row_num`` rows of ``col_num``
high-resolution tokens each followed by a newline; ``mask`` marks the newline column, ``image_token_index1`` /
``image_token_index2`` / ``row_end_token_index`` are the base, high-resolution and newline positions, two graphs
(``A1`` / ``A2``) keep ``topk(int(keep_ratio * 576))`` and ``topk(int(keep_ratio * row_num * col_num))``, and
``image_keep_indices`` is the ascending sort of both kept lists and every newline.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["official_scores", "official_keep", "official_keep_count", "official_next_keep"]


def official_scores(image_feature: Tensor, similarity: float = 0.5, temperature: float = 0.03, iterate_num: int = 5) -> Tensor:
    """(n,): the official ``result1`` for one image's (n, D) projected tokens, element by element in its op order."""
    normalized = torch.nn.functional.normalize(image_feature, p=2, dim=1)
    adjacency = normalized @ normalized.t()
    n = adjacency.shape[0]
    for i in range(n):  # A[A < similarity] = 0, then A / temperature, then A[|A| < 1e-6] = -5000, entry by entry
        for j in range(n):
            if adjacency[i, j] < similarity:
                adjacency[i, j] = 0
    adjacency = adjacency / temperature
    for i in range(n):
        for j in range(n):
            if abs(adjacency[i, j]) < 1e-6:
                adjacency[i, j] = -5000
    adjacency = torch.nn.functional.softmax(adjacency, dim=1)
    degree = torch.sum(adjacency > 0, dim=1)
    adjacency = torch.matrix_power(adjacency, iterate_num)
    weight = torch.norm(image_feature, dim=-1).view(1, -1).to(dtype=adjacency.dtype)
    result = weight @ adjacency
    result = result / degree
    return result.flatten()


def official_keep_count(keep_ratio: float, n: int) -> int:
    """``int(keep_ratio * n)``: the official count (truncation)."""
    return int(keep_ratio * n)


def official_keep(image_feature: Tensor, count: int, **params) -> list[int]:
    """The kept token indices of one image, ascending: ``result.topk(count).indices`` sorted."""
    result = official_scores(image_feature, **params).view(1, -1)
    keep = result.topk(count).indices.flatten()
    return torch.sort(keep)[0].tolist()


def official_next_keep(
    image_feature: Tensor, base_tokens: int, row_num: int, col_num: int, keep_ratio: float = 0.5, **params
) -> list[int]:
    """The kept positions among one LLaVA-NeXT image's packed tokens (n, D), ascending, as the official block computes
    them: ``base_tokens`` base-image tokens (576 officially), then ``row_num`` rows of ``col_num`` tokens + 1 newline."""
    image1_token_length = base_tokens
    image2_token_length = row_num * (col_num + 1)
    assert image_feature.shape[0] == image1_token_length + image2_token_length
    mask = torch.zeros(row_num, col_num + 1)
    mask[:, -1] = 1
    mask = mask.flatten()
    image_token_index1 = torch.arange(0, image1_token_length)
    image_token_index2 = torch.where(mask == 0)[0] + image1_token_length
    row_end_token_index = torch.where(mask == 1)[0] + image1_token_length
    result1 = official_scores(image_feature[image_token_index1].clone(), **params).view(1, -1)
    result2 = official_scores(image_feature[image_token_index2].clone(), **params).view(1, -1)
    keep_indices1 = image_token_index1[result1.topk(int(keep_ratio * image1_token_length)).indices].flatten()
    keep_indices2 = image_token_index2[result2.topk(int(keep_ratio * row_num * col_num)).indices].flatten()
    return torch.sort(torch.cat((keep_indices1, keep_indices2, row_end_token_index), dim=0))[0].tolist()
