"""A plain, loop-style re-implementation of PruneVid's official functions (Visual-AI/PruneVid @ b12600c6,
``models/pllava/modeling_pllava.py``: ``cluster_dpc_knn``, ``refine_clusters``, ``segment_lengths``,
``merge_frames_dynamic``; ``elastic_cache.py``: ``process_attention``), written independently of
``vtprune.strategies.functional.prunevid`` for the tests. The DPC-KNN noise is drawn from a generator in the
official call order (one ``rand(1, N)`` per call)."""

from __future__ import annotations

import math

import torch

__all__ = ["ref_dpc_knn", "ref_refine", "ref_segment_lengths", "ref_merge_video", "ref_process_attention"]


def ref_dpc_knn(points: list[list[float]], cluster_num: int, k: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
    n, c = len(points), len(points[0])
    noise = torch.rand(1, n, generator=generator)[0].tolist()
    d = [[math.dist(points[i], points[j]) / math.sqrt(c) for j in range(n)] for i in range(n)]
    density = []
    for i in range(n):
        near = sorted(d[i])[:k]
        density.append(math.exp(-sum(v * v for v in near) / k) + noise[i] * 1e-6)
    dmax = max(max(row) for row in d)
    parent = []
    for i in range(n):
        best = dmax
        for j in range(n):
            if density[j] > density[i] and d[i][j] < best:
                best = d[i][j]
        parent.append(best)
    score = [parent[i] * density[i] for i in range(n)]
    centers = sorted(range(n), key=lambda i: (-score[i], i))[:cluster_num]
    labels = []
    for i in range(n):
        best_m = 0
        for m in range(cluster_num):
            if d[centers[m]][i] < d[centers[best_m]][i]:
                best_m = m
        labels.append(best_m)
    for m, center in enumerate(centers):
        labels[center] = m
    return labels, centers


def ref_refine(labels: list[int]) -> list[int]:
    n = len(labels)
    out = list(labels)
    for label in sorted(set(labels)):
        segments = []
        i = 0
        while i < n:
            if labels[i] == label:
                j = i
                while j + 1 < n and labels[j + 1] == label:
                    j += 1
                segments.append((i, j))
                i = j + 1
            else:
                i += 1
        longest = max(e - s + 1 for s, e in segments)
        for s, e in segments:
            if longest == 1 or e - s + 1 != longest:
                for x in range(s, e + 1):
                    out[x] = -1
    i = 0
    while i < n:
        if out[i] != -1:
            i += 1
            continue
        s = i
        while i < n and out[i] == -1:
            i += 1
        e = i - 1
        left, left_len, right, right_len = None, 0, None, 0
        if s > 0:
            left = out[s - 1]
            j = s - 1
            while j >= 0 and out[j] == left:
                left_len += 1
                j -= 1
        if e < n - 1:
            right = out[e + 1]
            j = e + 1
            while j < n and out[j] == right:
                right_len += 1
                j += 1
        if left_len > right_len:
            new = left
        elif right_len > left_len:
            new = right
        else:
            new = left if left is not None else right
        if new is None:
            new = 0
        for x in range(s, e + 1):
            out[x] = new
    return out


def ref_segment_lengths(labels: list[int]) -> list[int]:
    lengths = [1]
    for i in range(1, len(labels)):
        if labels[i] == labels[i - 1]:
            lengths[-1] += 1
        else:
            lengths.append(1)
    return lengths


def _cos(a: list[float], b: list[float]) -> float:
    na = max(math.sqrt(sum(x * x for x in a)), 1e-12)
    nb = max(math.sqrt(sum(x * x for x in b)), 1e-12)
    return sum(x * y for x, y in zip(a, b)) / (na * nb)


def _mean(vectors: list[list[float]]) -> list[float]:
    return [sum(v[i] for v in vectors) / len(vectors) for i in range(len(vectors[0]))]


def _cluster(feats: list[list[float]], slots: list[int], ratio: float, generator: torch.Generator) -> list[tuple[int, list[float]]]:
    if len(feats) <= 14:
        return list(zip(slots, feats))
    num = int(len(feats) * ratio)
    labels, centers = ref_dpc_knn(feats, num, 7, generator)
    out = []
    for m, center in enumerate(centers):
        members = [feats[i] for i in range(len(feats)) if labels[i] == m]
        out.append((slots[center], _mean(members)))
    return out


def ref_merge_video(video: torch.Tensor, tau: float, cluster_ratio: float, segment_ratio: float, generator: torch.Generator):
    """``merge_frames_dynamic`` on one video (T, n, D): ``(segments, groups)`` where ``groups`` lists, in the
    official order (per segment: static, then each frame's dynamic tokens), the merged tokens of each group as
    ``(position in the T * n frame tokens, value)`` (the position rule of vtprune: the cluster centre's, static ones
    in the segment's first frame)."""
    t_len, n, _ = video.shape
    frames = [[video[t, p].tolist() for p in range(n)] for t in range(t_len)]
    means = [_mean(frames[t]) for t in range(t_len)]
    labels, _ = ref_dpc_knn(means, max(1, int(t_len * segment_ratio)), min(7, t_len), generator)
    segments = ref_segment_lengths(ref_refine(labels))
    groups = []
    start = 0
    for width in segments:
        static = []
        for p in range(n):
            if width < 2:
                static.append(False)
                continue
            total = 0.0
            for t in range(width):
                inner = sum(_cos(frames[start + w][p], frames[start + t][p]) for w in range(width))
                total += inner - 1
            static.append(total / (width * (width - 1)) > tau)
        where = [p for p in range(n) if static[p]]
        feats = [_mean([frames[start + w][p] for w in range(width)]) for p in where]
        groups.append(_cluster(feats, [start * n + p for p in where], cluster_ratio, generator) if feats else [])
        moving = [p for p in range(n) if not static[p]]
        for w in range(width):
            feats = [frames[start + w][p] for p in moving]
            slots = [(start + w) * n + p for p in moving]
            groups.append(_cluster(feats, slots, cluster_ratio, generator) if feats else [])
        start += width
    return segments, groups


def ref_process_attention(scores: list[float], sizes: list[int], alpha: float) -> list[int]:
    """Kept indices (ascending) of ``process_attention`` with groups of ``sizes`` laid end to end (ties to the
    earlier token)."""
    kept, start = [], 0
    for size in sizes:
        members = list(range(start, start + size))
        ranked = sorted(members, key=lambda i: (-scores[i], i))
        kept.extend(ranked[: int(size * alpha)])
        start += size
    return sorted(kept)
