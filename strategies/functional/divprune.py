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

from .common import CountLike, cosine_matrix, mask_from_positions, per_row_counts, valid_or_all, valid_rows

__all__ = ["divprune_keep_count", "divprune_sequence", "divprune_select", "divprune_supplement"]


def divprune_keep_count(n_tokens: int, ratio: float = 0.098) -> int:
    """Official ``threshold_terms = int(round(threshold_ratio * image_feature_length))``."""
    return int(round(ratio * n_tokens))


def divprune_sequence(features: Tensor, count: int) -> Tensor:
    """(count,) long picks of the greedy max-min selection over ``features`` (n, d), in pick order.

    May contain repeated indices (see module docstring). Uses a running minimum, which equals the
    official recomputed ``min`` over the selected rows exactly (min does not round). A step is one
    argmax, one distance row and one minimum.
    """
    if count == 0:
        return torch.empty(0, dtype=torch.long, device=features.device)
    dist = 1.0 - cosine_matrix(features)  # (n, n)
    pick = torch.argmax(_first_pick_scores(dist)).view(1)  # (1,)
    picks = [pick]
    running = dist[pick]  # (1, n) min distance to the selected set
    for i in range(1, count):
        pick = running.argmax(dim=1)  # (1,) first maximum
        picks.append(pick)
        if i + 1 < count:
            running = torch.minimum(running, dist[pick])  # (1, n)
    return torch.cat(picks)  # (count,)


def _first_pick_scores(dist: Tensor) -> Tensor:
    """(n,) official step-0 scores: each column's second smallest distance (a lone token: its own)."""
    if dist.shape[0] >= 2:
        return torch.topk(dist, 2, dim=0, largest=False).values[1, :]  # (n,)
    return dist[0]  # (1,): a single token is the only choice


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
    positions = valid_rows(valid, batch, tokens, visual.device)
    kept = []
    for b, (pos, k) in enumerate(zip(positions, per_row_counts(counts, batch))):
        row = visual[b] if pos is None else visual[b, pos]  # (n, D)
        picks = divprune_sequence(row, max(0, min(k, row.shape[0])))  # (k,)
        kept.append(picks if pos is None else pos[picks])
    return mask_from_positions(kept, batch, tokens, visual.device)


def divprune_supplement(visual: Tensor, selected: Tensor, counts: CountLike, valid: Optional[Tensor] = None) -> Tensor:
    """DivPrune's max-min greedy as a supplement: ``counts[b]`` more tokens, none in ``selected``.

    Same arithmetic as :func:`divprune_sequence` on each row's valid slice, with two differences
    that only matter where the official code would not give ``count`` distinct tokens:
    already-chosen tokens are excluded from the argmax (the official code can re-pick a token when
    every remaining one is an exact duplicate; then it keeps fewer tokens and its set is a prefix of
    ours), and a non-empty ``selected`` set seeds the running minimum instead of the first-token
    rule (second-smallest distance), which applies only when ``selected`` is empty.

    Exclusion costs nothing per step: the distance matrix's diagonal is set to -inf (after the
    first-token rule has read it), so a token's running minimum becomes -inf once it is chosen.
    With non-finite distances (a zero feature vector: the official ``1 - cos`` has no epsilon) a
    NaN would survive ``minimum``, so that case masks the chosen tokens explicitly every step.

    Returns: (B, N) bool, exactly ``min(counts[b], unselected valid)`` new tokens per row.
    """
    batch, tokens, _ = visual.shape
    if isinstance(counts, int) and torch.compiler.is_compiling():
        return _divprune_supplement_static(visual, selected, counts, valid_or_all(valid, batch, tokens, visual.device))
    positions = valid_rows(valid, batch, tokens, visual.device)
    kept = []
    for b, (pos, k) in enumerate(zip(positions, per_row_counts(counts, batch))):
        row = visual[b] if pos is None else visual[b, pos]  # (n, D)
        taken = selected[b] if pos is None else selected[b, pos]  # (n,)
        n_taken = int(taken.sum())
        k = max(0, min(k, row.shape[0] - n_taken))
        if k == 0:
            kept.append(torch.empty(0, dtype=torch.long, device=visual.device))
            continue
        picks = _max_min_supplement(1.0 - cosine_matrix(row), taken, n_taken, k)  # (k,)
        kept.append(picks if pos is None else pos[picks])
    return mask_from_positions(kept, batch, tokens, visual.device)


def _max_min_supplement(dist: Tensor, taken: Tensor, n_taken: int, count: int) -> Tensor:
    """(count,) long: the greedy max-min picks on one row's (n, n) distances, excluding ``taken`` (n,)."""
    picks = []
    if n_taken == 0:
        pick = torch.argmax(_first_pick_scores(dist)).view(1)  # (1,)
        picks.append(pick)
    finite = bool(torch.isfinite(dist.sum()))  # finite cosine distances lie in [0, 2]: a finite sum means no NaN / inf
    if finite:
        dist.diagonal().fill_(float("-inf"))  # a chosen token's running minimum becomes -inf
        running = dist[picks[0]] if n_taken == 0 else dist[taken].min(dim=0, keepdim=True).values  # (1, n)
        while len(picks) < count:
            pick = running.argmax(dim=1)  # (1,) first maximum among the free tokens
            picks.append(pick)
            if len(picks) < count:
                running = torch.minimum(running, dist[pick])  # (1, n)
        return torch.cat(picks)
    chosen = taken.clone().unsqueeze(0)  # (1, n)
    if n_taken == 0:
        chosen[0, picks[0]] = True
        running = dist[picks[0]]  # (1, n)
    else:
        running = dist[taken].min(dim=0, keepdim=True).values  # (1, n)
    while len(picks) < count:
        pick = running.masked_fill(chosen, float("-inf")).argmax(dim=1)  # (1,)
        picks.append(pick)
        chosen[0, pick] = True
        running = torch.minimum(running, dist[pick])  # (1, n)
    return torch.cat(picks)


def _divprune_supplement_static(visual: Tensor, selected: Tensor, count: int, valid: Tensor) -> Tensor:
    """`divprune_supplement` for ``torch.compile``: ``count`` picks per row, no host sync, no
    data-dependent shape or branch (``count`` must not exceed any row's free real tokens).

    Works on the whole row with padding masked instead of on the gathered valid slice, and takes
    both seeding branches with ``where``; for rows without padding every value equals the eager one.
    """
    batch, tokens, _ = visual.shape
    keep = torch.zeros(batch, tokens, dtype=torch.bool, device=visual.device)  # (B, N)
    for b in range(batch):
        real = valid[b : b + 1]  # (1, N)
        taken = selected[b : b + 1] & real  # (1, N)
        dist = 1.0 - cosine_matrix(visual[b])  # (N, N)
        seed_scores = _first_pick_scores(dist.masked_fill(~real.transpose(0, 1), float("inf")))  # (N,)
        first = seed_scores.masked_fill(~real[0], float("-inf")).argmax().view(1)  # (1,)
        empty = ~taken.any()  # () no token selected yet: the first-token rule seeds the row
        running = dist.masked_fill(~taken.transpose(0, 1), float("inf")).amin(dim=0, keepdim=True)  # (1, N)
        chosen = taken | ~real  # (1, N) never picked
        for step in range(count):
            pick = running.masked_fill(chosen, float("-inf")).argmax(dim=1)  # (1,)
            if step == 0:
                pick = torch.where(empty, first, pick)
            row = dist.index_select(0, pick)  # (1, N)
            running = torch.where(empty, row, torch.minimum(running, row)) if step == 0 else torch.minimum(running, row)
            chosen = chosen.index_fill(1, pick, True)
            keep[b] = keep[b].index_fill(0, pick, True)
    return keep
