"""Shared helpers for the peer re-implementations (pure tensor code, no framework imports).

The official implementations all run one image at a time on a contiguous 1-D slice of image
tokens. To reproduce them bit for bit (including which of two tied scores wins), every selection
here gathers the valid tokens of a row, in order, into a dense slice and applies the same torch
op the official code applies to its slice. Rows are therefore independent by construction.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

__all__ = [
    "CountLike",
    "valid_or_all",
    "row_positions",
    "valid_rows",
    "per_row_counts",
    "mask_from_positions",
    "cosine_matrix",
    "topk_keep",
    "argsort_keep",
    "topk_indices",
    "argsort_indices",
    "COSINE_EPS",
    "unit_rows",
]

#: A per-row token count: one int for every row, or a (B,) long tensor.
CountLike = Union[int, Tensor]


def valid_or_all(valid: Optional[Tensor], batch: int, tokens: int, device: torch.device) -> Tensor:
    """(B, N) bool validity mask; all True when ``valid`` is None."""
    if valid is None:
        return torch.ones(batch, tokens, dtype=torch.bool, device=device)
    if valid.dtype != torch.bool or tuple(valid.shape) != (batch, tokens):
        raise ValueError(f"valid must be a ({batch}, {tokens}) bool tensor, got {valid.dtype} {tuple(valid.shape)}")
    return valid


def row_positions(valid: Tensor) -> list[Tensor]:
    """For each row of a (B, N) bool mask, the (n_b,) long positions of its True entries, ascending."""
    return [torch.nonzero(row, as_tuple=False).flatten() for row in valid]


def valid_rows(valid: Optional[Tensor], batch: int, tokens: int, device: torch.device) -> list[Optional[Tensor]]:
    """Per row, the (n_b,) positions of its valid tokens, or None for a row whose tokens are all valid.

    When every token of the batch is valid (``valid`` None or all True) every entry is None: the
    caller then works on the row in place, with no gather copy, which gives the same result as the
    gathered slice (identical values in identical order).
    """
    if valid is None:
        return [None] * batch
    valid = valid_or_all(valid, batch, tokens, device)
    if bool(valid.all()):
        return [None] * batch
    return row_positions(valid)


def per_row_counts(counts: CountLike, batch: int) -> list[int]:
    """Broadcast an int or a (B,) tensor of counts to a list of B Python ints."""
    if isinstance(counts, Tensor):
        flat = counts.reshape(-1)
        if flat.numel() == 1:
            return [int(flat.item())] * batch
        if flat.numel() != batch:
            raise ValueError(f"counts has {flat.numel()} entries for a batch of {batch}")
        return [int(c) for c in flat.tolist()]
    return [int(counts)] * batch


def mask_from_positions(positions: list[Tensor], batch: int, tokens: int, device: torch.device) -> Tensor:
    """(B, N) bool mask with True at the given absolute positions of each row."""
    keep = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    for b, pos in enumerate(positions):
        if pos.numel():
            keep[b].index_fill_(0, pos.to(device=device, dtype=torch.long), True)
    return keep


def cosine_matrix(x: Tensor) -> Tensor:
    """(..., n, n) cosine similarities of the rows of ``x`` (..., n, d).

    Official arithmetic shared by DivPrune / CDPruner / VisPruner: divide by the L2 norm (no
    epsilon, so a zero vector yields NaN exactly as in the official code), then one matmul.
    """
    unit = x / x.norm(dim=-1, keepdim=True)  # (..., n, d)
    return unit @ unit.transpose(-1, -2)  # (..., n, n)


def topk_keep(scores: Tensor, counts: CountLike, valid: Optional[Tensor] = None) -> Tensor:
    """Keep the ``counts[b]`` highest-scoring valid tokens of each row.

    Args:
        scores: (B, N) float scores.
        counts: int or (B,) long; clamped to the number of valid tokens of the row.
        valid: (B, N) bool or None.

    Returns:
        (B, N) bool keep mask.

    Tie rule: ``torch.topk`` on the dense 1-D slice of the row's valid tokens (in positional
    order), i.e. the exact call FastV / PyramidDrop make on their image-token slice. The kept
    *set* is what matters; torch.topk's order among equal scores is implementation-defined, and
    using the same call on the same slice reproduces whatever it does.
    """
    batch, tokens = scores.shape
    if isinstance(counts, int) and torch.compiler.is_compiling():
        return _topk_keep_static(scores, counts, valid)
    kept = []
    for b, (pos, k) in enumerate(zip(valid_rows(valid, batch, tokens, scores.device), per_row_counts(counts, batch))):
        row = scores[b] if pos is None else scores[b, pos]  # (n_b,)
        chosen = row.topk(max(0, min(k, row.shape[0]))).indices  # (k,)
        kept.append(chosen if pos is None else pos[chosen])
    return mask_from_positions(kept, batch, tokens, scores.device)


def _topk_keep_static(scores: Tensor, count: int, valid: Optional[Tensor]) -> Tensor:
    """`topk_keep` without host syncs or data-dependent shapes (for ``torch.compile``): one ``topk``
    along the rows with padding scored -inf. For rows without padding this is the same ``topk``
    call on the same values as the eager row slice; the compiled select only runs such rows."""
    batch, tokens = scores.shape
    ranked = scores if valid is None else scores.masked_fill(~valid, float("-inf"))  # (B, N)
    chosen = ranked.topk(max(0, min(count, tokens)), dim=1).indices  # (B, k)
    keep = torch.zeros(batch, tokens, dtype=torch.bool, device=scores.device).scatter(1, chosen, True)  # (B, N)
    return keep if valid is None else keep & valid


def argsort_keep(scores: Tensor, counts: CountLike, valid: Optional[Tensor] = None) -> Tensor:
    """Like :func:`topk_keep` but with VisPruner's op: the first ``counts[b]`` entries of
    ``argsort(descending=True)`` on the row's valid slice (its tie order may differ from topk's)."""
    batch, tokens = scores.shape
    kept = []
    for b, (pos, k) in enumerate(zip(valid_rows(valid, batch, tokens, scores.device), per_row_counts(counts, batch))):
        row = scores[b] if pos is None else scores[b, pos]  # (n_b,)
        order = row.unsqueeze(0).argsort(dim=-1, descending=True)[0]  # (n_b,)
        chosen = order[: max(0, min(k, row.shape[0]))]  # (k,)
        kept.append(chosen if pos is None else pos[chosen])
    return mask_from_positions(kept, batch, tokens, scores.device)


def topk_indices(scores: Tensor, count: int) -> Tensor:
    """(B, count) long: each row's ``count`` highest-scoring positions, ascending.

    The index form of :func:`topk_keep` for rows without padding and one count: the same ``topk`` call on
    the same slice (a batch of one is one slice, as in ``topk_keep``'s row loop), so the same tokens win ties;
    ``sorted=False`` only skips ordering the chosen values (the set is chosen before that sort, which the
    index sort below replaces). ``0 <= count <= N``.
    """
    if scores.shape[0] == 1:
        chosen = scores.topk(count, dim=1, sorted=False).indices  # (1, k)
    else:
        chosen = torch.stack([row.topk(count, sorted=False).indices for row in scores])  # (B, k)
    return chosen.sort(dim=1).values  # (B, k)


def argsort_indices(scores: Tensor, count: int) -> Tensor:
    """(B, count) long: the index form of :func:`argsort_keep` for rows without padding and one count (the
    first ``count`` entries of each row's ``argsort(descending=True)``), ascending."""
    if scores.shape[0] == 1:
        order = scores.argsort(dim=-1, descending=True)  # (1, N)
    else:
        order = torch.cat([row.unsqueeze(0).argsort(dim=-1, descending=True) for row in scores])  # (B, N)
    return order[:, :count].sort(dim=1).values  # (B, k)


#: ``F.cosine_similarity``'s default ``eps``: the floor of each vector's norm before it divides (`unit_rows`).
COSINE_EPS = 1e-8


def unit_rows(x: Tensor, *, inplace: bool = False) -> Tensor:
    """``x / max(||x||, COSINE_EPS)`` over the last dim, the per-vector half of ``F.cosine_similarity`` (ATen divides
    each side by its clamped norm, multiplies and sums over the dim), so ``(unit_rows(a) * unit_rows(b)).sum(-1)``
    equals ``F.cosine_similarity(a, b, dim=-1)`` bit for bit (tests/strategies/test_video_speed.py) while each frame
    of a video is divided by its norm once rather than once per pair it takes part in. Same shape and dtype as ``x``;
    ``inplace`` divides ``x`` itself (a buffer the caller owns) instead of allocating a new one."""
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(COSINE_EPS)  # (..., 1)
    return x.div_(norms) if inplace else x / norms
