"""G-Prune as the official code runs it, one image at a time (test code only, never imported by the package).

Source: github.com/jytmelon/G-Prune @ 762c63771212104958ddbc508d0c421e95adafc9, ``LLaVA-NeXT/llava/model/llava_arch.py``,
``LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal``, the block after ``encode_images`` (base-image part:
``image1_feature_normalized`` ... ``keep_indices1``). Re-written in our own words with the official op order: normalise,
similarity matrix, cut below ``similarity``, divide by ``temperature``, give near-zero entries the logit -5000, row
softmax, degree = positive entries per row, ``matrix_power``, norms times the powered matrix, divided by the degree,
``topk(int(keep_ratio * n))``, ascending sort. The official code computes in the model dtype; these references run in
whatever dtype they are given (float32 in the tests).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["official_scores", "official_keep", "official_keep_count"]


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
