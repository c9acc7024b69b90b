"""DivPrune (Alvar et al., CVPR 2025): diversity-based visual token pruning (max-min problem).

Official code: github.com/vbdi/divprune @ 799e2d950aa01ba7860907f5a6d86061f885dca6,
``LLaVA/llava/model/llava_arch.py``: ``pairwise_cosine_similarity``, ``DivPrune`` and the call in
``prepare_inputs_labels_for_multimodal`` (``LAYER_INDEX=0``, ``SUBSET_RATIO=0.098`` default).

Rules reproduced:
* count = ``int(round(ratio * N))`` (Python round: half to even).
* features = the post-projector image embeddings (LLM input embeddings, layer 0).
* distance = ``1.0 - (Xn @ Xn.T)`` with ``Xn = X / X.norm(dim=1, keepdim=True)`` (no epsilon).
* step 0: ``scores = topk(D, 2, dim=0, largest=False).values[1]`` (each column's SECOND smallest
  distance, i.e. the distance to its nearest other token); pick ``argmax(scores)``.
* step i > 0: ``scores = min over already selected rows of D`` (``torch.min(D[s[:i]], dim=0)``);
  pick ``argmax(scores)``.
* ``torch.argmax`` returns the FIRST index among equal maxima.
* Quirk kept: selected tokens are NOT masked out; their score is their self-distance
  ``1 - cos(x, x)`` (about 0, may be a tiny positive float), so when every unselected token is an
  exact duplicate of a selected one, a token can be picked twice and the kept set is smaller
  than ``count``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .common import CountLike, cosine_matrix, mask_from_positions, per_row_counts, row_positions, valid_or_all

__all__ = ["divprune_keep_count", "divprune_sequence", "divprune_select", "divprune_supplement"]


def divprune_keep_count(n_tokens: int, ratio: float = 0.098) -> int:
    """Official ``threshold_terms = int(round(threshold_ratio * image_feature_length))``."""
    return int(round(ratio * n_tokens))


def divprune_sequence(features: Tensor, count: int) -> Tensor:
    """(count,) long picks of the greedy max-min selection over ``features`` (n, d), in pick order.

    May contain repeated indices (see module docstring). Uses a running minimum, which equals the
    official recomputed ``min`` over the selected rows exactly (min does not round).
    """
    n = features.shape[0]
    picks = torch.empty(count, dtype=torch.long, device=features.device)
    if count == 0:
        return picks
    dist = 1.0 - cosine_matrix(features)  # (n, n)
    if n >= 2:
        scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :]  # (n,)
    else:
        scores = dist[0]  # (1,): a single token is the only choice
    picks[0] = torch.argmax(scores)
    running = dist[picks[0]].clone()  # (n,) min distance to the selected set
    for i in range(1, count):
        picks[i] = torch.argmax(running)
        running = torch.minimum(running, dist[picks[i]])
    return picks


def divprune_select(visual: Tensor, counts: CountLike, valid: Optional[Tensor] = None) -> Tensor:
    """DivPrune keep mask.

    Args:
        visual: (B, N, D) post-projector visual embeddings.
        counts: int or (B,) long (see :func:`divprune_keep_count`); clamped to the valid count.
        valid: (B, N) bool or None.

    Returns:
        (B, N) bool keep mask (a row may keep fewer than ``counts`` tokens only in the
        duplicate-token quirk described in the module docstring).
    """
    batch, tokens, _ = visual.shape
    valid = valid_or_all(valid, batch, tokens, visual.device)
    kept = []
    for b, (pos, k) in enumerate(zip(row_positions(valid), per_row_counts(counts, batch))):
        k = max(0, min(k, int(pos.numel())))
        kept.append(pos[divprune_sequence(visual[b, pos], k)])  # (k,)
    return mask_from_positions(kept, batch, tokens, visual.device)


def divprune_supplement(visual: Tensor, selected: Tensor, counts: CountLike, valid: Optional[Tensor] = None) -> Tensor:
    """DivPrune's max-min greedy as a supplement: ``counts[b]`` more tokens, none in ``selected``.

    Same arithmetic as :func:`divprune_sequence` on each row's valid slice, with two differences
    that only matter where the official code would not give ``count`` distinct tokens:
    already-chosen tokens are excluded from the argmax (the official code can re-pick a token when
    every remaining one is an exact duplicate; then it keeps fewer tokens and its set is a prefix of
    ours), and a non-empty ``selected`` set seeds the running minimum instead of the first-token
    rule (second-smallest distance), which applies only when ``selected`` is empty.

    Returns: (B, N) bool, exactly ``min(counts[b], unselected valid)`` new tokens per row.
    """
    batch, tokens, _ = visual.shape
    valid = valid_or_all(valid, batch, tokens, visual.device)
    kept = []
    for b, (pos, k) in enumerate(zip(row_positions(valid), per_row_counts(counts, batch))):
        n = int(pos.numel())
        taken = selected[b, pos].clone()  # (n,)
        k = max(0, min(k, n - int(taken.sum())))
        picks = []
        if k == 0:
            kept.append(pos[:0])
            continue
        dist = 1.0 - cosine_matrix(visual[b, pos])  # (n, n)
        if bool(taken.any()):
            running = dist[taken].min(dim=0).values  # (n,)
        else:
            first = torch.topk(dist, 2, dim=0, largest=False).values[1, :] if n >= 2 else dist[0]
            pick = int(torch.argmax(first))
            picks.append(pick)
            taken[pick] = True
            running = dist[pick].clone()
        while len(picks) < k:
            pick = int(torch.argmax(running.masked_fill(taken, float("-inf"))))
            picks.append(pick)
            taken[pick] = True
            running = torch.minimum(running, dist[pick])
        kept.append(pos[torch.tensor(picks, dtype=torch.long, device=pos.device)])
    return mask_from_positions(kept, batch, tokens, visual.device)
