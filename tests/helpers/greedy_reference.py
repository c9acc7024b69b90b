"""Reference copies of the greedy selection loops as they were before the op-count work (issue 19).

Kept verbatim, with the shared helpers of ``strategies/functional/common.py`` they used so that ``tests/test_greedy_equivalence.py`` can
check that the optimised kernels in ``strategies/functional`` pick exactly the same tokens. Test code
only: never imported by the package.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

__all__ = [
    "farthest_point_select", "divprune_select", "divprune_supplement", "cdpruner_relevance", "cdpruner_select",
    "cdpruner_supplement", "topk_keep", "top_k_mask", "selection_from_masks_reference",
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
            keep[b, pos.to(device=device, dtype=torch.long)] = True
    return keep


def cosine_matrix(x: Tensor) -> Tensor:
    """(..., n, n) cosine similarities of the rows of ``x`` (..., n, d).

    Official arithmetic shared by DivPrune / CDPruner / VisPruner: divide by the L2 norm (no
    epsilon, so a zero vector yields NaN exactly as in the official code), then one matmul.
    """
    unit = x / x.norm(dim=-1, keepdim=True)  # (..., n, d)
    return unit @ unit.transpose(-1, -2)  # (..., n, n)


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

def cdpruner_relevance(
    clip_visual: Tensor,
    clip_text: Tensor,
    valid: Optional[Tensor] = None,
    clip_text_mask: Optional[Tensor] = None,
) -> Tensor:
    """(B, N) min-max normalised (negated) relevance; 0 at invalid positions.

    Args:
        clip_visual: (B, N, C) CLIP image embeddings of the patches.
        clip_text: (B, M, C) CLIP text embeddings of the instruction.
        valid: (B, N) bool or None. clip_text_mask: (B, M) bool or None.
    """
    batch, tokens, _ = clip_visual.shape
    valid = valid_or_all(valid, batch, tokens, clip_visual.device)
    text_mask = valid_or_all(clip_text_mask, batch, clip_text.shape[1], clip_text.device)
    out = torch.zeros(batch, tokens, dtype=torch.result_type(clip_visual, clip_text), device=clip_visual.device)
    for b, pos in enumerate(row_positions(valid)):
        if pos.numel() == 0:
            continue
        image = clip_visual[b, pos].unsqueeze(0)  # (1, n, C)
        text = clip_text[b, text_mask[b]]  # (m, C)
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        rel = torch.matmul(image, text.t())  # (1, n, m)
        rel = (-rel).mean(dim=-1)  # (1, n)
        rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())  # (1, n)
        out[b, pos] = rel[0].to(out.dtype)
    return out


def cdpruner_kernel(visual: Tensor, relevance: Tensor, theta: Optional[float] = None) -> Tensor:
    """(B, N, N) conditional DPP kernel ``r_i * cos(v_i, v_j) * r_j`` (fp32).

    Args:
        visual: (B, N, D) post-projector visual features. relevance: (B, N).
        theta: None (official default) uses r directly; otherwise ``r = exp(alpha * r)`` with
            ``alpha = theta / (2 * (1 - theta))``.
    """
    unit = visual / visual.norm(dim=-1, keepdim=True)  # (B, N, D)
    unit = unit.float()
    similarity = torch.matmul(unit, unit.transpose(1, 2))  # (B, N, N)
    if theta is not None:
        alpha = theta / (2 * (1 - theta))
        relevance = torch.exp(alpha * relevance)
    return relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)  # (B, N, N)

def _greedy_map(kernel: Tensor, steps: int) -> Tensor:
    """(steps,) picks of the official fast greedy MAP on a (1, n, n) kernel (batch of one)."""
    batch, n, _ = kernel.shape
    device = kernel.device
    rows = torch.arange(batch, device=device)
    cis = torch.zeros((steps, batch, n), device=device)  # (T, 1, n) fp32 like official
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # (1, n)
    select_idx = torch.empty((steps, batch), dtype=torch.long, device=device)  # (T, 1)
    for i in range(steps):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (kernel[rows, j] - torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])) / torch.sqrt(
            di2s[rows, j]
        ).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[rows, j] = -float("inf")
    return select_idx[:, 0]

def cdpruner_select(
    visual: Tensor,
    clip_visual: Tensor,
    clip_text: Tensor,
    counts: CountLike,
    valid: Optional[Tensor] = None,
    clip_text_mask: Optional[Tensor] = None,
    theta: Optional[float] = None,
) -> Tensor:
    """CDPruner keep mask.

    Args:
        visual: (B, N, D) post-projector visual features (kernel similarity).
        clip_visual: (B, N, C), clip_text: (B, M, C): CLIP embeddings (relevance).
        counts: int or (B,) long ``visual_token_num``; clamped to the valid count.
        valid: (B, N) bool or None; clip_text_mask: (B, M) bool or None.
        theta: see :func:`cdpruner_kernel` (None = official default).

    Returns:
        (B, N) bool keep mask. Kernel and greedy run on each row's valid tokens only.
    """
    batch, tokens, _ = visual.shape
    valid = valid_or_all(valid, batch, tokens, visual.device)
    relevance = cdpruner_relevance(clip_visual, clip_text, valid, clip_text_mask)  # (B, N)
    kept = []
    for b, (pos, k) in enumerate(zip(row_positions(valid), per_row_counts(counts, batch))):
        k = max(0, min(k, int(pos.numel())))
        kernel = cdpruner_kernel(visual[b : b + 1, pos], relevance[b : b + 1, pos], theta)  # (1, n, n)
        kept.append(pos[_greedy_map(kernel, k)])
    return mask_from_positions(kept, batch, tokens, visual.device)

def _conditional_greedy_map(kernel: Tensor, forced: list[int], steps: int) -> list[int]:
    """Fast greedy MAP on a (1, n, n) kernel conditioned on the ``forced`` picks (processed first).

    With no forced pick this is :func:`_greedy_map` op for op (same picks), except that picked
    tokens are excluded from the argmax explicitly (the official code relies on ``d2[j] = -inf``,
    which NaN/inf arithmetic past the kernel's rank can undo, re-picking a token; when every free
    ``d2`` is -inf we take the first free token), so exactly ``steps`` distinct tokens come out. A forced pick whose residual
    ``d2 <= 0`` (already in the span of earlier picks) is marked without an update.
    """
    batch, n, _ = kernel.shape
    device = kernel.device
    rows = torch.arange(batch, device=device)
    total = len(forced) + steps
    cis = torch.zeros((total, batch, n), device=device)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # (1, n)
    picked = torch.zeros(batch, n, dtype=torch.bool, device=device)
    out: list[int] = []
    used = 0
    for i in range(total):
        if i < len(forced):
            j = torch.tensor([forced[i]], device=device)
            if not bool(di2s[rows, j] > 0):
                picked[rows, j] = True
                di2s[rows, j] = -float("inf")
                continue
        else:
            j = torch.argmax(di2s.masked_fill(picked, -float("inf")), dim=-1)
            if bool(picked[rows, j].any()):  # every free d2 is -inf (degenerate kernel): first free token
                j = torch.argmax((~picked).to(torch.int8), dim=-1)
            out.append(int(j))
        eis = (kernel[rows, j] - torch.einsum("tb,tbn->bn", cis[:used, rows, j], cis[:used])) / torch.sqrt(
            di2s[rows, j]
        ).unsqueeze(-1)
        cis[used, :, :] = eis
        used += 1
        di2s -= torch.square(eis)
        di2s[rows, j] = -float("inf")
        picked[rows, j] = True
    return out

def cdpruner_supplement(
    visual: Tensor,
    relevance: Optional[Tensor],
    selected: Tensor,
    counts: CountLike,
    valid: Optional[Tensor] = None,
    theta: Optional[float] = None,
) -> Tensor:
    """CDPruner's conditional-DPP greedy MAP as a supplement (``counts[b]`` more tokens per row).

    Args:
        visual: (B, N, D) features for the cosine similarity; relevance: (B, N) or None (all 1).
        selected: (B, N) bool tokens already chosen: the greedy is conditioned on them.
        counts, valid, theta: as :func:`cdpruner_select`.
    With ``selected`` empty and ``relevance = cdpruner_relevance(...)`` this is
    :func:`cdpruner_select` exactly (kernel and greedy on each row's valid slice).
    """
    batch, tokens, _ = visual.shape
    valid = valid_or_all(valid, batch, tokens, visual.device)
    if relevance is None:
        relevance = torch.ones(batch, tokens, device=visual.device)
    kept = []
    for b, (pos, k) in enumerate(zip(row_positions(valid), per_row_counts(counts, batch))):
        taken = selected[b, pos]
        k = max(0, min(k, int(pos.numel()) - int(taken.sum())))
        if k == 0:
            kept.append(pos[:0])
            continue
        kernel = cdpruner_kernel(visual[b : b + 1, pos], relevance[b : b + 1, pos], theta)  # (1, n, n)
        forced = torch.nonzero(taken, as_tuple=False).flatten().tolist()
        picks = _conditional_greedy_map(kernel, forced, k)
        kept.append(pos[torch.tensor(picks, dtype=torch.long, device=pos.device)])
    return mask_from_positions(kept, batch, tokens, visual.device)

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
    valid = valid_or_all(valid, batch, tokens, scores.device)
    kept = []
    for b, (pos, k) in enumerate(zip(row_positions(valid), per_row_counts(counts, batch))):
        k = max(0, min(k, int(pos.numel())))
        row = scores[b, pos]  # (n_b,)
        kept.append(pos[row.topk(k).indices])
    return mask_from_positions(kept, batch, tokens, scores.device)

def top_k_mask(scores: Tensor, counts: Tensor, valid: Tensor) -> Tensor:
    """(B, N) bool: the ``counts[b]`` highest-scoring real tokens of row b.

    Ties go to the lower index (a stable descending sort), so the result is deterministic.
    NaN scores rank last. ``counts`` is clamped to the number of real tokens.

    >>> top_k_mask(torch.tensor([[1.0, 3.0, 3.0, 2.0]]), torch.tensor([2]), torch.ones(1, 4, dtype=torch.bool)).tolist()
    [[False, True, True, False]]
    """
    ranked = scores.float().nan_to_num(nan=float("-inf")).masked_fill(~valid, float("-inf"))  # (B, N)
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices  # (B, N)
    counts = torch.minimum(counts.long(), valid.sum(dim=1))  # (B,)
    take = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0) < counts.unsqueeze(1)  # (B, N)
    keep = torch.zeros_like(valid)
    keep.scatter_(1, order, take)
    return keep & valid


def selection_from_masks_reference(
    keep: Tensor, critical: Tensor, values: Optional[Tensor] = None
) -> dict:
    """Build a `Selection` from dense masks.

    Args:
        keep: (B, N) bool, True at every kept token.
        critical: (B, N) bool, True at kept tokens chosen by the critical selector (subset of keep).
        values: (B, N, D) or None: replacement values indexed by token position; only the kept
            positions are read.
    """
    counts = keep.sum(dim=1)  # (B,)
    width = int(counts.max().item()) if keep.numel() else 0
    positions = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)  # (B, N)
    # Kept positions first, in ascending order: sort by (not kept, position).
    order_key = torch.where(keep, positions, positions + keep.shape[1])  # (B, N)
    order = order_key.argsort(dim=1)[:, :width]  # (B, K)
    slot_mask = torch.arange(width, device=keep.device).unsqueeze(0) < counts.unsqueeze(1)  # (B, K)
    indices = torch.where(slot_mask, order, torch.zeros_like(order))  # (B, K)
    kept_critical = critical.gather(1, indices) & slot_mask  # (B, K)
    kept_values = None
    if values is not None:
        index = indices.unsqueeze(-1).expand(-1, -1, values.shape[-1])  # (B, K, D)
        kept_values = values.gather(1, index)
    return dict(indices=indices, mask=slot_mask, critical=kept_critical, values=kept_values)
