"""Greedy farthest-point sampling in cosine space (ZSPAPrune's diversity stage), batched."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["farthest_point_select", "max_similarity_to_set", "CPU_CHUNK_BYTES"]

#: On CPU, rows are processed in chunks whose unit vectors fit in about this many bytes, so every
#: greedy step reads them from cache instead of memory (each step streams the whole chunk).
#: Rows are independent, so chunking never changes a result; on GPUs the whole batch runs at once.
CPU_CHUNK_BYTES = 16 * 2**20


def max_similarity_to_set(unit: Tensor, selected: Tensor) -> Tensor:
    """(B, N) float32: each token's highest cosine similarity to the selected tokens of its row.

    ``unit`` (B, N, D) holds unit vectors; ``selected`` (B, N) bool. Rows with nothing selected
    get -inf. Memory is O(B * N * K) for K selected tokens (never N x N).
    """
    batch, tokens, _ = unit.shape
    width = int(selected.sum(dim=1).max().item()) if selected.numel() else 0
    if width == 0:
        return torch.full((batch, tokens), float("-inf"), device=unit.device)
    positions = torch.arange(tokens, device=unit.device).expand(batch, tokens)  # (B, N)
    order = torch.where(selected, positions, positions + tokens).argsort(dim=1)[:, :width]  # (B, K)
    slot_real = torch.gather(selected, 1, order)  # (B, K)
    members = unit.gather(1, order.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))  # (B, K, D)
    similarity = unit @ members.transpose(1, 2)  # (B, N, K)
    similarity = similarity.masked_fill(~slot_real.unsqueeze(1), float("-inf"))
    return similarity.max(dim=-1).values  # (B, N)


def farthest_point_select(
    visual: Tensor,
    selected: Tensor,
    counts: Union[int, Tensor],
    valid: Tensor,
    scores: Optional[Tensor] = None,
) -> Tensor:
    """(B, N) bool: ``counts[b]`` more tokens of row b chosen by greedy farthest-point sampling.

    ``counts`` is (B,) long, or one int for every row (then at most each row's free real tokens).

    Each step adds the candidate whose highest cosine similarity to the already selected set
    (``selected`` plus earlier picks) is lowest; ties go to the lower index. Candidates are real,
    unselected tokens.

    Seed rule when a row's ``selected`` set is empty: the first pick is the highest-scoring token
    when ``scores`` (B, N) are given, otherwise the token least similar to the mean of the row's
    real tokens (the most atypical one). Both are deterministic.

    Time O(N * K * D) per row and memory O(N * (K_selected + D)); every step is batched over the
    rows of a chunk (the whole batch on GPU, cache-sized chunks on CPU). All maths in float32.

    Under ``torch.compile`` with an int ``counts`` it runs without host syncs (see
    :func:`_farthest_point_static`).
    """
    batch, tokens, dim = visual.shape
    if isinstance(counts, int) and torch.compiler.is_compiling():
        return _farthest_point_static(visual, selected, counts, valid, scores)
    rows_per_chunk = batch
    if visual.device.type == "cpu":
        rows_per_chunk = max(1, CPU_CHUNK_BYTES // max(1, tokens * dim * 4))
    if rows_per_chunk >= batch:
        return _farthest_point_rows(visual, selected, counts, valid, scores)
    parts = []
    for start in range(0, batch, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        parts.append(
            _farthest_point_rows(visual[rows], selected[rows], counts if isinstance(counts, int) else counts[rows], valid[rows],
                                 None if scores is None else scores[rows])
        )
    return torch.cat(parts)


def _farthest_point_rows(
    visual: Tensor, selected: Tensor, counts: Union[int, Tensor], valid: Tensor, scores: Optional[Tensor]
) -> Tensor:
    """`farthest_point_select` on one chunk of rows, every step batched over them.

    One running key per row holds each candidate's highest similarity to the selected set, and
    +inf at tokens that cannot be picked (padding, selected, picked), so a step is: one argmin, one
    gather of the picked unit vector, one matrix-vector product, one maximum, one write of +inf at
    the pick. Rows with fewer picks than the longest row keep stepping (rows are independent); their
    extra picks are dropped at the end. Non-finite features (NaN similarities would escape the +inf
    guard of ``maximum``) take the same loop with the guard re-applied every step.
    """
    unit = torch.nn.functional.normalize(visual.float(), dim=-1)  # (B, N, D)
    batch, tokens, dim = unit.shape
    if isinstance(counts, int):
        steps = counts
    else:
        counts = counts.long()
        steps = int(counts.max().item()) if counts.numel() else 0
    if steps <= 0:
        return torch.zeros_like(valid)
    blocked = ~valid | selected  # (B, N) never picked
    empty = ~selected.any(dim=1)  # (B,)
    any_empty = bool(empty.any())
    max_sim = None  # (B, N) highest similarity to the selected set; None: every row starts from its seed
    if not any_empty or not bool(empty.all()):
        max_sim = max_similarity_to_set(unit, selected)  # (B, N)
    if any_empty:
        if scores is not None:
            seed_key = -scores.float()  # (B, N): argmin = highest score
        else:
            weights = valid.float().unsqueeze(-1)  # (B, N, 1)
            centre = (unit * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, D)
            seed_key = torch.einsum("bnd,bd->bn", unit, torch.nn.functional.normalize(centre, dim=-1))
        max_sim = seed_key if max_sim is None else torch.where(empty.unsqueeze(1), seed_key, max_sim)
    finite = bool(torch.isfinite(unit.sum()))  # entries of unit vectors are in [-1, 1]: a finite sum means no NaN / inf
    key = max_sim.masked_fill(blocked, float("inf")).unsqueeze(-1)  # (B, N, 1)
    guard = None if finite else blocked.unsqueeze(-1).clone()  # (B, N, 1)
    columns = unit.transpose(1, 2)  # (B, D, N) view
    picks = []
    for step in range(steps):
        choice = key.argmin(dim=1, keepdim=True)  # (B, 1, 1) first minimum = lower index on ties
        picks.append(choice)
        newest = columns.gather(2, choice.expand(batch, dim, 1))  # (B, D, 1)
        similarity = torch.bmm(unit, newest)  # (B, N, 1)
        if step == 0 and any_empty:
            similarity = torch.where(empty.view(batch, 1, 1), similarity, torch.maximum(key, similarity))
            key = similarity.masked_fill(blocked.unsqueeze(-1), float("inf"))
        else:
            key = torch.maximum(key, similarity)
        key.scatter_(1, choice, float("inf"))
        if guard is not None:
            guard.scatter_(1, choice, True)
            key.masked_fill_(guard, float("inf"))
    return _picks_mask(torch.cat(picks, dim=1).view(batch, steps), counts, tokens)  # (B, N)


def _picks_mask(order: Tensor, counts: Union[int, Tensor], tokens: int) -> Tensor:
    """(B, N) bool: the first ``counts[b]`` entries of row b of ``order`` (B, S) set to True."""
    batch, steps = order.shape
    if isinstance(counts, int):  # every row keeps all its picks
        return torch.zeros(batch, tokens, dtype=torch.bool, device=order.device).scatter_(1, order, True)
    live = torch.arange(steps, device=order.device) < counts.unsqueeze(1)  # (B, S)
    target = order.masked_fill(~live, tokens)  # (B, S): dropped picks go to a sink column
    mask = torch.zeros(batch, tokens + 1, dtype=torch.bool, device=order.device)
    return mask.scatter_(1, target, True)[:, :tokens]  # (B, N)


def _farthest_point_static(visual: Tensor, selected: Tensor, count: int, valid: Tensor, scores: Optional[Tensor]) -> Tensor:
    """`farthest_point_select` for ``torch.compile``: ``count`` steps for every row, no host sync and no
    data-dependent shape or branch.

    Same rules and step arithmetic as the eager loop; two differences in how the state is built:
    the highest similarity to the ``selected`` set comes from the full (B, N, N) similarity matrix
    (the size of the set is not known when tracing), and picked tokens are re-masked every step
    (the eager loop does so only for non-finite features). A product that rounds differently can
    only change a pick between near-tied candidates.
    """
    unit = torch.nn.functional.normalize(visual.float(), dim=-1)  # (B, N, D)
    batch, tokens, dim = unit.shape
    if count <= 0:
        return torch.zeros_like(valid)
    blocked = ~valid | selected  # (B, N)
    empty = ~selected.any(dim=1, keepdim=True)  # (B, 1)
    similarity = torch.bmm(unit, unit.transpose(1, 2))  # (B, N, N)
    max_sim = similarity.masked_fill(~selected.unsqueeze(1), float("-inf")).amax(dim=-1)  # (B, N)
    if scores is not None:
        seed_key = -scores.float()  # (B, N)
    else:
        weights = valid.float().unsqueeze(-1)  # (B, N, 1)
        centre = (unit * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, D)
        seed_key = torch.einsum("bnd,bd->bn", unit, torch.nn.functional.normalize(centre, dim=-1))
    key = torch.where(empty, seed_key, max_sim).masked_fill(blocked, float("inf")).unsqueeze(-1)  # (B, N, 1)
    guard = blocked.unsqueeze(-1)  # (B, N, 1)
    columns = unit.transpose(1, 2)  # (B, D, N)
    picks = []
    for step in range(count):
        choice = key.argmin(dim=1, keepdim=True)  # (B, 1, 1)
        picks.append(choice)
        newest = columns.gather(2, choice.expand(batch, dim, 1))  # (B, D, 1)
        step_similarity = torch.bmm(unit, newest)  # (B, N, 1)
        if step == 0:
            step_similarity = torch.where(empty.unsqueeze(-1), step_similarity, torch.maximum(key, step_similarity))
        else:
            step_similarity = torch.maximum(key, step_similarity)
        guard = guard.scatter(1, choice, True)
        key = step_similarity.masked_fill(guard, float("inf"))  # (B, N, 1)
    return _picks_mask(torch.cat(picks, dim=1).view(batch, count), count, tokens)  # (B, N)
