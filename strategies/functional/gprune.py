"""G-Prune (Jiang et al., AAAI 2025, arXiv 2501.02268): importance by information flow on a similarity graph.

Official code: github.com/jytmelon/G-Prune @ 762c63771212104958ddbc508d0c421e95adafc9,
``LLaVA-NeXT/llava/model/llava_arch.py``, ``prepare_inputs_labels_for_multimodal`` (the block after
``encode_images``). Per image, on the projected visual tokens ``x`` (n, D):

1. ``A = normalize(x) @ normalize(x).T`` (cosine similarity graph);
2. edges below ``similarity`` are cut (set to 0), the rest divided by ``temperature``; cut entries
   (``|A| < 1e-6``) get the logit ``CUT_LOGIT`` so the row-wise softmax gives them weight 0;
3. ``A = softmax(A, dim=1)`` (row-stochastic transition matrix), ``degree = (A > 0).sum(1)``;
4. ``A = A ** iterations`` (``matrix_power``): ``iterations`` steps of propagation;
5. ``score = (||x_i||)_i @ A / degree``: every token's norm (its information) flows along the graph; a
   token's score is what reaches it, divided by its own degree (hubs of near-duplicates are discounted).

The official code then keeps ``topk(int(keep_ratio * n))`` (the `gprune` preset: ``critical.topk_official`` and
``budget.gprune``). This module is the score only, one row at a time on the row's real tokens, so a row gives the
same scores alone as in any batch (padding is never part of a graph).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .common import valid_rows

__all__ = ["CUT_LOGIT", "CUT_EPS", "gprune_scores", "gprune_row_scores"]

#: The logit the official code gives a cut edge (``A[abs(A) < 1e-6] = -5000``): exp(-5000 - max) underflows to an
#: exact 0 in fp16 / bf16 / fp32, so a cut edge carries no flow and does not count in the degree.
CUT_LOGIT = -5000.0
#: The official test for a cut edge after the temperature division (``abs(A) < 1e-6``).
CUT_EPS = 1e-6


def gprune_row_scores(features: Tensor, similarity: float, temperature: float, iterations: int) -> Tensor:
    """(n,) float32: G-Prune's propagated importance of the n tokens of one image.

    Args:
        features: (n, D) the image's visual tokens (the projector output at ``pre_llm``).
        similarity: edges with cosine similarity below it are cut (official 0.5).
        temperature: the softmax temperature of the transition matrix (official 0.03).
        iterations: propagation steps, the power of the transition matrix (official 5).
    Computed in float32, in the official op order.
    """
    x = features.float()  # (n, D)
    if x.shape[0] == 0:
        return x.new_zeros(0)
    unit = torch.nn.functional.normalize(x, p=2, dim=1)  # (n, D)
    graph = unit @ unit.t()  # (n, n) cosine similarity
    graph.masked_fill_(graph < similarity, 0)  # cut the weak edges (official A[A < similarity] = 0, one op)
    graph.div_(temperature)  # (n, n), in place (the official A / temperature, same values)
    graph.masked_fill_(graph.abs() < CUT_EPS, CUT_LOGIT)  # official A[abs(A) < 1e-6] = -5000
    graph = torch.softmax(graph, dim=1)  # (n, n) row-stochastic
    degree = (graph > 0).sum(dim=1)  # (n,) long
    graph = torch.matrix_power(graph, iterations)  # (n, n)
    weight = torch.norm(x, dim=-1).view(1, -1)  # (1, n) every token's information
    flow = weight @ graph  # (1, n) what reaches each token
    return (flow / degree).flatten()  # (n,)


def gprune_scores(
    visual: Tensor, valid: Optional[Tensor], similarity: float, temperature: float, iterations: int
) -> Tensor:
    """(B, N) float32: `gprune_row_scores` of each row's real tokens (one graph per row); padding scores 0.

    Args:
        visual: (B, N, D) visual tokens.
        valid: (B, N) bool real tokens, or None (all real).
        similarity, temperature, iterations: as in `gprune_row_scores`.
    """
    batch, tokens = visual.shape[:2]
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    scores = torch.zeros(batch, tokens, dtype=torch.float32, device=visual.device)  # (B, N)
    for b, positions in enumerate(valid_rows(valid, batch, tokens, visual.device)):
        if positions is None:
            scores[b] = gprune_row_scores(visual[b], similarity, temperature, iterations)  # (N,)
        else:
            scores[b, positions] = gprune_row_scores(visual[b, positions], similarity, temperature, iterations)  # (n_b,)
    return scores
