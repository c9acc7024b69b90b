"""A plain, loop-by-loop re-implementation of OpenVINO GenAI's CDPruner (C++ in openvino.genai @ da1db864d,
``src/cpp/src/visual_language/cdpruner/``), written independently of ``strategies/functional/cdpruner_ov.py``
to test it. Scalars are numpy float32 so every step rounds like the C++ ``float`` code. Test code only.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["keep_count", "text_feature", "relevance", "kernel", "greedy", "select"]

EPS = np.float32(1e-6)
NEG_INF = np.float32(-np.inf)
F32_MAX = np.float32(np.finfo(np.float32).max)


def keep_count(total: int, ratio: int) -> int:
    """``CDPruner::apply_pruning``: no pruning at ratio <= 0 or >= 100, else std::round(total * (1 - ratio / 100.0))."""
    if ratio <= 0 or ratio >= 100:
        return total
    x = total * (1 - ratio / 100.0)
    return int(math.floor(x) + (1 if x - math.floor(x) >= 0.5 else 0))


def text_feature(prompt: np.ndarray) -> np.ndarray:
    """``extract_text_features``: sum of the instruction embeddings, then divide by their count."""
    prompt = prompt.astype(np.float32)
    acc = [np.float32(0)] * prompt.shape[1]
    for row in prompt:
        for d in range(prompt.shape[1]):
            acc[d] = np.float32(acc[d] + row[d])
    n = np.float32(prompt.shape[0])
    return np.array([[a / n for a in acc]], dtype=np.float32)


def _normalize(v: np.ndarray) -> list[np.float32]:
    s = np.float32(0)
    for x in v:
        s = np.float32(s + np.float32(x) * np.float32(x))
    norm = np.float32(np.sqrt(np.float32(s + EPS)))
    return [np.float32(np.float32(x) / norm) for x in v]


def _dot(a, b) -> np.float32:
    s = np.float32(0)
    for x, y in zip(a, b):
        s = np.float32(s + x * y)
    return s


def relevance(visual: np.ndarray, text: np.ndarray) -> list[np.float32]:
    """Raw relevance: mean over text rows of the eps-normalised dot products (not negated)."""
    vs = [_normalize(v) for v in visual]
    ts = [_normalize(t) for t in text]
    out = []
    for v in vs:
        s = np.float32(0)
        for t in ts:
            s = np.float32(s + _dot(v, t))
        out.append(np.float32(s / np.float32(len(ts))))
    return out


def kernel(visual: np.ndarray, raw: list, weight: float) -> np.ndarray:
    """The ``CDPruner_Kernel_Model`` graph: min-max (eps in the range), S = Vn Vn^T, (1-w) S + w (r_i S) r_j."""
    lo = min(raw)
    hi = max(raw)
    r = [np.float32((x - lo) / np.float32(np.float32(hi - lo) + EPS)) for x in raw]
    vs = [_normalize(v) for v in visual]
    n = len(vs)
    w = np.float32(weight)
    one_minus = np.float32(np.float32(1.0) - w)
    out = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        for j in range(n):
            s = _dot(vs[i], vs[j])
            cond = np.float32(np.float32(r[i] * s) * r[j])
            out[i, j] = np.float32(np.float32(s * one_minus) + np.float32(cond * w))
    return out


def greedy(k: np.ndarray, steps: int) -> list[int]:
    """``FastGreedyDPP::select_single_batch`` (picks in pick order)."""
    n = k.shape[0]
    d2 = [np.float32(k[i, i]) for i in range(n)]
    cis = [[np.float32(0)] * n for _ in range(steps)]
    picks = []
    for t in range(steps):
        best, best_val = 0, NEG_INF
        for i in range(n):
            if d2[i] > best_val:  # NaN compares False
                best, best_val = i, d2[i]
        picks.append(best)
        inv = np.float32(np.float32(1.0) / np.float32(np.sqrt(np.float32(d2[best] + EPS))))
        out = [np.float32(x) for x in k[best]]
        for p in range(t):
            c = cis[p][best]
            if abs(c) < EPS:
                continue
            for m in range(n):
                out[m] = np.float32(out[m] - np.float32(c * cis[p][m]))
        for m in range(n):
            out[m] = np.float32(out[m] * inv)
        cis[t] = out
        for m in range(n):
            if d2[m] <= NEG_INF:
                continue
            new = np.float32(d2[m] - np.float32(out[m] * out[m]))
            d2[m] = -F32_MAX if np.isnan(new) else new
        d2[best] = NEG_INF
    return picks


def select(visual: np.ndarray, text: np.ndarray, keep: int, weight: float = 0.5, split_threshold: int = 1) -> list[int]:
    """``CDPruner::select_tokens`` for one image: optional split, per-half kernels, sorted kept indices."""
    n = visual.shape[0]
    if split_threshold > 0 and n > split_threshold:
        half = n // 2
        first = greedy(kernel(visual[:half], relevance(visual[:half], text), weight), keep // 2)
        second = greedy(kernel(visual[half:], relevance(visual[half:], text), weight), keep - keep // 2)
        return sorted(first + [half + i for i in second])
    return sorted(greedy(kernel(visual, relevance(visual, text), weight), keep))
