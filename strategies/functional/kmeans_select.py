"""k-means diversity: the candidate nearest each centroid (scikit-learn's KMeans, seeded)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["kmeans_select"]


def kmeans_select(
    visual: Tensor, selected: Tensor, counts: Tensor, valid: Tensor, seed: int = 0, n_init: int = 1, max_iter: int = 100
) -> Tensor:
    """(B, N) bool: ``counts[b]`` more tokens of row b, one per k-means cluster of its candidates.

    The candidates (real, unselected tokens) are L2-normalised and clustered into ``counts[b]``
    clusters (k-means++ initialisation, ``random_state=seed``); from each cluster the candidate
    nearest its centroid is kept (ties: lower index). A centroid whose nearest candidate is already
    taken takes its next nearest free one. Rows run one at a time (scikit-learn is per sample).
    """
    from sklearn.cluster import KMeans

    picked = torch.zeros_like(valid)
    unit = torch.nn.functional.normalize(visual.float(), dim=-1)  # (B, N, D)
    for row in range(visual.shape[0]):
        want = int(counts[row])
        if want <= 0:
            continue
        candidates = torch.nonzero(valid[row] & ~selected[row]).flatten()  # (C,)
        if want >= candidates.numel():
            picked[row, candidates] = True
            continue
        points = unit[row, candidates].detach().cpu().double().numpy()  # (C, D)
        model = KMeans(n_clusters=want, random_state=seed, n_init=n_init, max_iter=max_iter)
        model.fit(points)
        distances = ((points[None, :, :] - model.cluster_centers_[:, None, :]) ** 2).sum(-1)  # (k, C)
        taken = np.zeros(candidates.numel(), dtype=bool)
        for centroid in range(want):
            order = np.argsort(distances[centroid], kind="stable")
            free = order[~taken[order]][0]
            taken[free] = True
        picked[row, candidates[torch.from_numpy(np.nonzero(taken)[0]).to(candidates.device)]] = True
    return picked
