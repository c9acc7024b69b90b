"""Density-peak clustering (DPC-KNN) and cluster means: the spatial clustering of PruneVid (and TCFormer's DPC-KNN).

Visual-AI/PruneVid @ b12600c6, ``models/pllava/modeling_pllava.py`` ``cluster_dpc_knn`` and
``compute_cluster_vectors``: distances ``cdist(x, x) / sqrt(C)`` (float32); local density
``exp(-mean(d_knn ** 2))`` over the ``k`` nearest tokens (the token itself included, distance 0); a noise of
``rand * 1e-6`` breaks density ties (official: the global torch RNG; here a ``torch.Generator`` the caller seeds,
drawing one (B, N) tensor exactly as the official call does); each token's distance to the nearest denser token
(the row's largest distance for the densest); centres = ``topk(distance * density, cluster_num)`` (in that order:
cluster j is the j-th highest score); every token joins its nearest centre (``argmin``, first on ties) and each
centre its own cluster. ``cluster_means`` averages each cluster's tokens (empty clusters: zeros).

Used by the ``prunevid`` preset (`vtprune.strategies.functional.prunevid`, docs/methods.md, "PruneVid").
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["DENSITY_NOISE", "dpc_knn", "cluster_means"]

#: Scale of the uniform noise added to densities to break ties (the official ``1e-6``).
DENSITY_NOISE = 1e-6


def dpc_knn(x: Tensor, cluster_num: int, k: int = 5, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """DPC-KNN on every row of ``x`` (B, N, C): ``(assignment (B, N) long cluster of each token, centers (B,
    cluster_num) long positions of the centres, cluster j first at ``centers[:, j]``)``. Needs ``k <= N`` and
    ``cluster_num <= N``."""
    batch, tokens, channels = x.shape
    if not 1 <= k <= tokens or not 1 <= cluster_num <= tokens:
        raise ValueError(f"dpc_knn needs 1 <= k <= N and 1 <= cluster_num <= N; got k={k}, cluster_num={cluster_num}, N={tokens}")
    with torch.no_grad():
        points = x.float()
        dist = torch.cdist(points, points) / (channels**0.5)  # (B, N, N)
        nearest = torch.topk(dist, k=k, dim=-1, largest=False).values  # (B, N, k)
        density = (-(nearest**2).mean(dim=-1)).exp()  # (B, N)
        noise = torch.rand(density.shape, generator=generator, dtype=density.dtype).to(density.device)
        density = density + noise * DENSITY_NOISE
        denser = (density[:, None, :] > density[:, :, None]).to(dist.dtype)  # (B, N, N): column denser than row
        dist_max = dist.flatten(1).max(dim=-1).values[:, None, None]  # (B, 1, 1)
        parent_dist = (dist * denser + dist_max * (1 - denser)).min(dim=-1).values  # (B, N)
        centers = torch.topk(parent_dist * density, k=cluster_num, dim=-1).indices  # (B, M)
        to_centers = dist.gather(1, centers.unsqueeze(-1).expand(-1, -1, tokens))  # (B, M, N)
        assignment = to_centers.argmin(dim=1)  # (B, N)
        own = torch.arange(cluster_num, device=x.device).expand(batch, -1)  # (B, M)
        assignment.scatter_(1, centers, own)
    return assignment, centers


def cluster_means(x: Tensor, assignment: Tensor, cluster_num: int) -> Tensor:
    """(B, M, C): the mean of each cluster's tokens of ``x`` (B, N, C) under ``assignment`` (B, N); zeros for an
    empty cluster (official ``compute_cluster_vectors``: one-hot matmul, counts clamped to 1)."""
    onehot = torch.nn.functional.one_hot(assignment, num_classes=cluster_num).to(x.dtype)  # (B, N, M)
    sums = torch.bmm(onehot.transpose(1, 2), x)  # (B, M, C)
    counts = onehot.sum(dim=1)  # (B, M)
    return sums / counts.clamp(min=1).unsqueeze(-1)
