"""DPC-KNN (strategies/functional/clustering.py) against a loop-style re-implementation of PruneVid's
``cluster_dpc_knn`` / ``compute_cluster_vectors`` with the same seeded noise; batch rows are independent given
their noise."""

from __future__ import annotations

import math

import pytest
import torch

from vtprune.strategies.functional.clustering import DENSITY_NOISE, cluster_means, dpc_knn


def _reference(x: torch.Tensor, cluster_num: int, k: int, noise: torch.Tensor) -> tuple[list[int], list[int]]:
    n, c = x.shape
    d = [[math.dist(x[i].tolist(), x[j].tolist()) / c**0.5 for j in range(n)] for i in range(n)]
    density = []
    for i in range(n):
        near = sorted(d[i])[:k]
        density.append(math.exp(-sum(v * v for v in near) / k) + float(noise[i]) * DENSITY_NOISE)
    dmax = max(max(row) for row in d)
    parent = [min([d[i][j] for j in range(n) if density[j] > density[i]], default=dmax) for i in range(n)]
    score = [parent[i] * density[i] for i in range(n)]
    centers = sorted(range(n), key=lambda i: (-score[i], i))[:cluster_num]
    assignment = [min(range(cluster_num), key=lambda m: (d[centers[m]][i], m)) for i in range(n)]
    for m, center in enumerate(centers):
        assignment[center] = m
    return assignment, centers


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n, cluster_num, k", [(20, 5, 3), (33, 10, 7), (12, 12, 5)])
def test_dpc_knn_equals_the_official_loops(seed, n, cluster_num, k):
    x = torch.randn(2, n, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()
    assignment, centers = dpc_knn(x, cluster_num, k, generator=torch.Generator().manual_seed(seed + 10))
    noise = torch.rand(2, n, generator=torch.Generator().manual_seed(seed + 10))
    for b in range(2):
        ref_assignment, ref_centers = _reference(x[b].double(), cluster_num, k, noise[b])
        assert centers[b].tolist() == ref_centers
        assert assignment[b].tolist() == ref_assignment


def test_cluster_means_and_bad_arguments():
    x = torch.arange(12.0).view(1, 4, 3)
    means = cluster_means(x, torch.tensor([[0, 0, 2, 2]]), 3)
    assert torch.equal(means[0, 0], x[0, :2].mean(0)) and torch.equal(means[0, 1], torch.zeros(3))
    with pytest.raises(ValueError, match="cluster_num"):
        dpc_knn(x, 5)
