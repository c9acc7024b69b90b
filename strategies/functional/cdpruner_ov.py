"""CDPruner as OpenVINO GenAI runs it: relevance from the LLM-space text embedding, OpenVINO's kernel,
its "split" variant and its fast greedy MAP.

Read from github.com/openvinotoolkit/openvino.genai (master snapshot of 2026-08-21, da1db864d, the code
shipped as openvino-genai 2026.4): ``src/cpp/src/visual_language/cdpruner/{cdpruner,conditional_kernel,
fast_dpp,cdpruner_config}.cpp`` and ``vision_token_pruning_processor.cpp`` (``extract_text_features``).

Rules reproduced (OpenVINO's default path, the ``CDPruner_Kernel_Model`` graph on CPU):

* kept count: ``round(N * (1 - pruning_ratio / 100.0))`` with ``std::round`` (half away from zero), per
  image; ``pruning_ratio`` 0 (or 100) leaves the image unpruned; a count of 0 is an error.
* text feature: the mean of the LLM input embeddings of the instruction tokens, ``(1, D)``.
* L2 normalisation with the epsilon added under the root: ``x / sqrt(sum(x^2) + eps)``, ``eps = 1e-6``
  (``Config::numerical_threshold``), for visual and text features alike.
* relevance: ``mean_m cos_eps(v_i, t_m)`` NOT negated (``use_negative_relevance = false``: the paper's
  negation is for CLIP), min-max normalised as ``(r - min) / (max - min + eps)`` over the part.
* kernel: ``S = Vn Vn^T``; ``L = (1 - w) * S + w * ((r_i * S) * r_j)``, ``w = relevance_weight`` (0.5).
* split (``split_threshold``, default 1, env ``CDPRUNER_SPLIT_THRESHOLD``; 0 = off): when
  ``N > split_threshold`` the tokens are cut at ``N // 2``; each half gets its own relevance
  normalisation, kernel and greedy; the first half keeps ``K // 2``, the second ``K - K // 2``.
* greedy (``FastGreedyDPP::select_single_batch``): ``j`` = first index whose ``d2`` is strictly
  greater than every earlier one, starting from -inf (0 when none is); ``e = K[j]``, then for each
  earlier pick ``p`` with ``|c_p[j]| >= eps``: ``e -= c_p[j] * c_p``; ``e *= 1 / sqrt(d2[j] + eps)``;
  ``d2 -= e^2`` except where ``d2`` is already -inf, NaN -> ``-FLT_MAX``; ``d2[j] = -inf``.
  The kept indices are returned sorted.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "OV_EPSILON",
    "OV_RELEVANCE_WEIGHT",
    "OV_SPLIT_THRESHOLD",
    "OV_MAX_PRUNING_RATIO",
    "ov_keep_count",
    "ov_text_feature",
    "ov_l2_normalize",
    "ov_relevance",
    "ov_minmax",
    "ov_kernel",
    "ov_greedy_map",
    "ov_split_parts",
    "ov_cdpruner_row",
    "ov_prompt_relevance",
]

#: ``Config::numerical_threshold``: epsilon of the L2 norms, the min-max range and the greedy's root.
OV_EPSILON: float = 1e-6
#: ``Config::relevance_weight`` default (``GenerationConfig.relevance_weight``).
OV_RELEVANCE_WEIGHT: float = 0.5
#: ``Config::split_threshold`` default: split every image of more than one token.
OV_SPLIT_THRESHOLD: int = 1
#: ``pruning_ratio`` is a percentage; 100 (like 0) means "do not prune" in ``CDPruner::apply_pruning``.
OV_MAX_PRUNING_RATIO: int = 100

_FLOAT32_MAX = torch.finfo(torch.float32).max


def _round_half_away(value: float) -> int:
    """``std::round`` for a non-negative double (exact: ``value - floor(value)`` is exact here)."""
    whole = math.floor(value)
    return int(whole + 1 if value - whole >= 0.5 else whole)


def ov_keep_count(total: int, pruning_ratio: int) -> int:
    """Visual tokens OpenVINO keeps of an image of ``total`` tokens at ``pruning_ratio`` percent.

    >>> [ov_keep_count(64, r) for r in (0, 50, 75, 90)]
    [64, 32, 16, 6]
    """
    if isinstance(pruning_ratio, bool) or not isinstance(pruning_ratio, int):
        raise TypeError(f"pruning_ratio must be an int percentage in [0, {OV_MAX_PRUNING_RATIO}], got {pruning_ratio!r}")
    if not 0 <= pruning_ratio <= OV_MAX_PRUNING_RATIO:
        raise ValueError(f"pruning_ratio must be in [0, {OV_MAX_PRUNING_RATIO}] (percent pruned), got {pruning_ratio}")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if pruning_ratio in (0, OV_MAX_PRUNING_RATIO):
        return total
    keep = _round_half_away(total * (1.0 - pruning_ratio / 100.0))
    if keep == 0 and total > 0:
        raise ValueError(
            f"pruning_ratio {pruning_ratio} keeps 0 of {total} tokens (OpenVINO refuses: 'Percentage is too small')"
        )
    return keep


def ov_text_feature(prompt: Tensor) -> Tensor:
    """(1, D) float32 mean of the instruction embeddings ``prompt`` (T, D); zeros when T == 0."""
    prompt = prompt.float()
    if prompt.shape[0] == 0:
        return prompt.new_zeros(1, prompt.shape[-1])
    return (prompt.sum(dim=0) / float(prompt.shape[0])).unsqueeze(0)  # (1, D)


def ov_l2_normalize(features: Tensor, eps: float = OV_EPSILON) -> Tensor:
    """(..., D) ``x / sqrt(sum(x^2) + eps)`` over the last axis (NormalizeL2, EpsMode ADD), float32."""
    features = features.float()
    return features / _sqrt_f32(features.square().sum(dim=-1, keepdim=True) + eps)  # (..., D)


def ov_relevance(visual: Tensor, text: Tensor, eps: float = OV_EPSILON) -> Tensor:
    """(n,) raw relevance: mean over the M text features of ``cos_eps(visual_i, text_m)`` (not negated).

    Args: visual (n, D), text (M, D), both in the LLM embedding space.
    """
    return (ov_l2_normalize(visual, eps) @ ov_l2_normalize(text, eps).t()).mean(dim=-1)  # (n,)


def ov_minmax(relevance: Tensor, eps: float = OV_EPSILON) -> Tensor:
    """(n,) ``(r - min) / (max - min + eps)`` (the kernel graph's min-max)."""
    low, high = relevance.min(), relevance.max()
    return (relevance - low) / (high - low + eps)  # (n,)


def ov_kernel(visual: Tensor, relevance: Tensor, relevance_weight: float = OV_RELEVANCE_WEIGHT, eps: float = OV_EPSILON) -> Tensor:
    """(n, n) OpenVINO's conditional kernel ``(1 - w) S + w (r_i S) r_j`` on min-max normalised ``relevance`` (n,)."""
    unit = ov_l2_normalize(visual, eps)  # (n, D)
    similarity = unit @ unit.t()  # (n, n)
    weighted = (relevance.unsqueeze(1) * similarity) * relevance.unsqueeze(0)  # (n, n)
    return similarity * (1.0 - relevance_weight) + weighted * relevance_weight  # (n, n)


def _sqrt_f32(value: Tensor) -> Tensor:
    """Correctly rounded float32 square root (``std::sqrt(float)``): through float64, which rounds
    exactly once more to the same float32. ``torch.sqrt`` on float32 CPU tensors can be an ulp off."""
    return torch.sqrt(value.double()).float()


def _first_strict_max(gains: Tensor) -> int:
    """Index of OpenVINO's ``argmax``: first value strictly above all before it, from -inf; 0 if none."""
    finite = torch.where(torch.isnan(gains), torch.full_like(gains, -math.inf), gains)  # (n,)
    best = finite.max()
    if bool(best == -math.inf):
        return 0
    return int(torch.nonzero(finite == best)[0, 0])


def ov_greedy_map(kernel: Tensor, steps: int, eps: float = OV_EPSILON) -> list[int]:
    """Picks, in pick order, of OpenVINO's fast greedy MAP on ``kernel`` (n, n) for ``steps`` steps."""
    n = kernel.shape[0]
    if not 0 <= steps <= n:
        raise ValueError(f"cannot select {steps} tokens from {n}")
    kernel = kernel.float()
    cis = torch.zeros(steps, n, device=kernel.device)  # (T, n)
    gains = torch.diagonal(kernel).clone()  # (n,)
    picks: list[int] = []
    for t in range(steps):
        j = _first_strict_max(gains)
        picks.append(j)
        row = kernel[j].clone()  # (n,)
        for p in range(t):
            c = cis[p, j]
            if bool(c.abs() < eps):
                continue
            row = row - c * cis[p]  # (n,)
        norm = _sqrt_f32(gains[j] + eps)  # (): float32, correctly rounded as std::sqrt(float)
        row = row * torch.div(torch.ones_like(norm), norm)  # (n,): C++ multiplies by 1.0f / norm
        # (``1.0 / tensor`` would go through ``reciprocal``, which can differ from 1.0f / x by an ulp)
        cis[t] = row
        updated = gains - row * row  # (n,)
        updated = torch.where(torch.isnan(updated), torch.full_like(updated, -_FLOAT32_MAX), updated)
        gains = torch.where(gains == -math.inf, gains, updated)
        gains[j] = -math.inf
    return picks


def ov_split_parts(total: int, keep: int, split_threshold: int = OV_SPLIT_THRESHOLD) -> list[tuple[int, int, int]]:
    """``(start, stop, keep)`` of each part OpenVINO runs separately.

    >>> ov_split_parts(64, 7), ov_split_parts(64, 7, split_threshold=0)
    ([(0, 32, 3), (32, 64, 4)], [(0, 64, 7)])
    """
    if split_threshold < 0:
        raise ValueError(f"split_threshold must be >= 0 (0 = no split), got {split_threshold}")
    if split_threshold > 0 and total > split_threshold:
        half = total // 2
        return [(0, half, keep // 2), (half, total, keep - keep // 2)]
    return [(0, total, keep)]


def ov_cdpruner_row(
    visual: Tensor,
    relevance: Tensor,
    keep: int,
    relevance_weight: float = OV_RELEVANCE_WEIGHT,
    split_threshold: int = OV_SPLIT_THRESHOLD,
    eps: float = OV_EPSILON,
) -> Tensor:
    """Sorted (keep,) long indices OpenVINO keeps of one image.

    Args:
        visual: (n, D) post-merger visual embeddings.
        relevance: (n,) raw relevance (:func:`ov_relevance`); min-max normalised here, per part.
        keep: tokens to keep (:func:`ov_keep_count`).
    """
    if not 0.0 <= relevance_weight <= 1.0:
        raise ValueError(f"relevance_weight must be in [0, 1], got {relevance_weight}")
    n = visual.shape[0]
    if not 0 <= keep <= n:
        raise ValueError(f"keep must be in [0, {n}], got {keep}")
    kept: list[int] = []
    for start, stop, count in ov_split_parts(n, keep, split_threshold):
        if count == 0:
            continue
        weights = ov_minmax(relevance[start:stop].float(), eps)  # (m,)
        kernel = ov_kernel(visual[start:stop], weights, relevance_weight, eps)  # (m, m)
        kept.extend(start + p for p in ov_greedy_map(kernel, count, eps))
    return torch.tensor(sorted(kept), dtype=torch.long)


def ov_prompt_relevance(visual: Tensor, prompt: Tensor, eps: Optional[float] = None) -> Tensor:
    """(n,) raw relevance of ``visual`` (n, D) to the mean of ``prompt`` (T, D) (the two steps together)."""
    return ov_relevance(visual, ov_text_feature(prompt), OV_EPSILON if eps is None else eps)

