"""Greedy farthest-point sampling in cosine space (ZSPAPrune's diversity stage), batched."""

from __future__ import annotations

from typing import Optional

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
    counts: Tensor,
    valid: Tensor,
    scores: Optional[Tensor] = None,
) -> Tensor:
    """(B, N) bool: ``counts[b]`` more tokens of row b chosen by greedy farthest-point sampling.

    Each step adds the candidate whose highest cosine similarity to the already selected set
    (``selected`` plus earlier picks) is lowest; ties go to the lower index. Candidates are real,
    unselected tokens.

    Seed rule when a row's ``selected`` set is empty: the first pick is the highest-scoring token
    when ``scores`` (B, N) are given, otherwise the token least similar to the mean of the row's
    real tokens (the most atypical one). Both are deterministic.

    Time O(N * K * D) per row and memory O(N * (K_selected + D)); every step is batched over the
    rows of a chunk (the whole batch on GPU, cache-sized chunks on CPU). All maths in float32.
    """
    batch, tokens, dim = visual.shape
    rows_per_chunk = batch
    if visual.device.type == "cpu":
        rows_per_chunk = max(1, CPU_CHUNK_BYTES // max(1, tokens * dim * 4))
    if rows_per_chunk >= batch:
        return _farthest_point_rows(visual, selected, counts, valid, scores)
    parts = []
    for start in range(0, batch, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        parts.append(
            _farthest_point_rows(visual[rows], selected[rows], counts[rows], valid[rows], None if scores is None else scores[rows])
        )
    return torch.cat(parts)


def _farthest_point_rows(
    visual: Tensor, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]
) -> Tensor:
    """`farthest_point_select` on one chunk of rows, every step batched over them."""
    unit = torch.nn.functional.normalize(visual.float(), dim=-1)  # (B, N, D)
    batch, tokens, _ = unit.shape
    counts = counts.long()
    max_sim = max_similarity_to_set(unit, selected)  # (B, N)
    empty = selected.sum(dim=1) == 0  # (B,)
    if bool(empty.any()):
        if scores is not None:
            seed_key = -scores.float()  # (B, N): argmin = highest score
        else:
            weights = valid.float().unsqueeze(-1)  # (B, N, 1)
            centre = (unit * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, D)
            seed_key = torch.einsum("bnd,bd->bn", unit, torch.nn.functional.normalize(centre, dim=-1))
        max_sim = torch.where(empty.unsqueeze(1), seed_key, max_sim)
    picked = torch.zeros_like(valid)
    available = valid & ~selected  # (B, N)
    rows = torch.arange(batch, device=unit.device)
    steps = int(counts.max().item()) if counts.numel() else 0
    for step in range(steps):
        active = counts > step  # (B,)
        key = max_sim.masked_fill(~available, float("inf"))  # (B, N)
        choice = key.argmin(dim=1)  # (B,) first minimum = lower index on ties
        picked[rows[active], choice[active]] = True
        available[rows[active], choice[active]] = False
        newest = unit[rows, choice]  # (B, D)
        similarity = torch.einsum("bnd,bd->bn", unit, newest)  # (B, N)
        if step == 0:
            updated = torch.where(empty.unsqueeze(1), similarity, torch.maximum(max_sim, similarity))
        else:
            updated = torch.maximum(max_sim, similarity)
        max_sim = torch.where(active.unsqueeze(1), updated, max_sim)
    return picked
