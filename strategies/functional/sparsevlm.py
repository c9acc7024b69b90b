"""SparseVLM (Gumpest/SparseVLMs @ b72c5d62, the ICML 2025 rank-based version): text raters, the rank rule and
token recycling, as plain tensor functions (docs/methods.md, "SparseVLM").

Official references (``llava/model/language_model/``):

* ``modelling_sparse_llama.py`` ``LlamaDynamicvitModel.forward``: raters = the text tokens whose
  ``softmax(v @ t^T, dim=text).mean(visual)`` is above its mean, chosen once on the decoder input embeddings; at
  every sparse layer the layer's own attention (head mean) of the raters' rows over the visual columns scores the
  visual tokens;
* ``score.py`` ``attn_postprocess_rank``: ``rank = matrix_rank(rows.float())``, keep the
  ``min(int(rank * scale + bias), v - 1)`` best tokens by ``rows.mean(raters)``; nothing is pruned when
  ``v == rank``;
* recycling (same forward): the top ``int(0.3 n) + 1`` deleted tokens by that score are clustered into
  ``int(m / 10) + 1`` groups by ``utils.py`` ``cluster_and_merge`` (density-peak clustering on the difference
  norms ``(x1 - x2).norm``) and each group's mean is appended after the kept visual tokens.

Every function works per row (rows are independent); ragged rows are given by ``valid`` masks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "OFFICIAL_SCALE_BIAS",
    "RECYCLE_SHARE",
    "CLUSTER_RATIO",
    "MERGE_EPS",
    "PAPER_LAYERS",
    "PAPER_DEPTH",
    "scale_bias_for",
    "sparse_layers_for",
    "text_raters",
    "rater_rows",
    "rank_keep_count",
    "recycle_counts",
    "cluster_and_merge",
    "pairwise_distances",
    "rank_counts",
    "recycle",
]

#: The official scripts' (scale, bias) per target budget of LLaVA-1.5's 576 tokens (README "Usage",
#: scripts/v1_5/eval/mme.sh 192, pope.sh 128, textvqa.sh 64).
OFFICIAL_SCALE_BIAS: dict[int, tuple[float, float]] = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}
#: Share of the deleted tokens recycled (``int(n * 0.3) + 1``, "Top 30%").
RECYCLE_SHARE = 0.3
#: Recycled tokens per cluster (``int(m / 10) + 1`` clusters).
CLUSTER_RATIO = 10
#: ``cluster_and_merge`` adds this to each cluster's weight before dividing (``all_weight + 1e-6``).
MERGE_EPS = 1e-6
#: The paper's sparse layers (0-based decoder layers whose *output* is pruned) and the depth they are for.
PAPER_LAYERS: tuple[int, ...] = (2, 6, 15)
PAPER_DEPTH = 32


def scale_bias_for(budget: object) -> tuple[float, float]:
    """The official (scale, bias) of a target budget (192, 128 or 64); ``ValueError`` naming the choices
    else."""
    if isinstance(budget, int) and not isinstance(budget, bool) and budget in OFFICIAL_SCALE_BIAS:
        return OFFICIAL_SCALE_BIAS[budget]
    choices = ", ".join(f"{b} -> scale={s}, bias={c}" for b, (s, c) in OFFICIAL_SCALE_BIAS.items())
    raise ValueError(
        f"SparseVLM's official scale/bias exist for the budgets {sorted(OFFICIAL_SCALE_BIAS)} only ({choices}); "
        f"got budget {budget!r}: pass scale= and bias= to budget.sparsevlm_rank for another target"
    )


def sparse_layers_for(num_layers: int) -> tuple[int, ...]:
    """vtprune drop layers (``sparse_layers(layers=...)``) for a decoder of ``num_layers`` layers: the paper's
    sparse layers 2, 6, 15 of 32 scaled by ``num_layers / 32`` (floor), + 1 (a vtprune drop before layer k prunes
    layer k - 1's output), duplicates and layers past the last left out (32 -> 3, 7, 16; 4 -> 1, 2)."""
    if num_layers < 2:
        raise ValueError(f"a layer drop needs a decoder of at least 2 layers, got {num_layers}")
    drops = {layer * num_layers // PAPER_DEPTH + 1 for layer in PAPER_LAYERS}
    return tuple(sorted(k for k in drops if k < num_layers))


def text_raters(visual: Tensor, prompt: Tensor, visual_valid: Tensor, prompt_valid: Tensor) -> Tensor:
    """(B, T) bool: SparseVLM's raters (Section 3.2.2): ``m = softmax(v @ t^T, dim=text).mean(visual)``, raters =
    the real prompt tokens with ``m > m.mean()``. A row with no token above the mean (all equal) rates with every
    prompt token (official: no rater; its scores are then NaN).

    Args:
        visual: (B, N, D); prompt: (B, T, D); visual_valid: (B, N) bool; prompt_valid: (B, T) bool.
    """
    logits = visual.float() @ prompt.float().transpose(1, 2)  # (B, N, T)
    logits = logits.masked_fill(~prompt_valid.unsqueeze(1), float("-inf"))
    probs = torch.softmax(logits, dim=2).nan_to_num(0.0)  # (B, N, T)
    probs = probs * visual_valid.unsqueeze(2)  # (B, N, T): padding rows out of the mean
    m = probs.sum(1) / visual_valid.sum(1, keepdim=True).clamp(min=1)  # (B, T)
    mean = (m * prompt_valid).sum(1, keepdim=True) / prompt_valid.sum(1, keepdim=True).clamp(min=1)  # (B, 1)
    raters = (m > mean) & prompt_valid  # (B, T)
    none = ~raters.any(dim=1, keepdim=True)  # (B, 1)
    return torch.where(none, prompt_valid, raters)


def rater_rows(prompt_attention: Tensor, raters: Tensor) -> Tensor:
    """(B, T, N) fp32: the head-mean attention rows of the prompt tokens, zero at non-raters (``self_attn_weights
    .mean(1)[:, raters, visual]``). prompt_attention: (B, H, T, N); raters: (B, T) bool."""
    rows = prompt_attention.float().mean(dim=1)  # (B, T, N)
    return rows * raters.unsqueeze(2)


def rank_keep_count(rank: int, visual: int, scale: float, bias: float) -> int:
    """Visual tokens kept by the rank rule: all (``visual``) when ``visual == rank``, else
    ``min(int(rank * scale + bias), visual - 1)`` (``int`` truncates; never below 0)."""
    if visual == rank:
        return visual
    return max(0, min(int(rank * scale + bias), visual - 1))


def recycle_counts(deleted: int) -> tuple[int, int]:
    """(recycled, clusters) for ``deleted`` pruned tokens: ``m = int(deleted * 0.3) + 1`` recycled,
    ``int(m / 10) + 1`` clusters; (0, 0) when nothing was deleted."""
    if deleted <= 0:
        return 0, 0
    recycled = min(int(deleted * RECYCLE_SHARE) + 1, deleted)
    return recycled, int(recycled / CLUSTER_RATIO) + 1


def rank_counts(
    prompt_attention: Tensor, raters: Tensor, valid: Tensor, scale: float, bias: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: (kept by the rank rule, clusters recycled, scores). ``scores`` (B, N) fp32 is the raters' mean
    attention per visual token (``relation_vis_text.mean(1)``); ``kept`` (B,) long the rank-rule count over the
    row's real tokens, ``clusters`` (B,) long the recycled clusters (0 when nothing is pruned). The rank is
    ``torch.linalg.matrix_rank`` of the fp32 rater rows over the row's real tokens (its default tolerance, as
    official)."""
    rows = rater_rows(prompt_attention, raters)  # (B, T, N)
    count = raters.sum(1).clamp(min=1)  # (B,)
    scores = rows.sum(1) / count.unsqueeze(1)  # (B, N): mean over the raters
    kept, clusters = [], []
    for b in range(rows.shape[0]):
        real = valid[b].nonzero().flatten()
        matrix = rows[b][raters[b]][:, real]  # (T_r, n)
        rank = int(torch.linalg.matrix_rank(matrix).item()) if matrix.numel() else 0
        keep = rank_keep_count(rank, real.numel(), scale, bias)
        kept.append(keep)
        clusters.append(recycle_counts(real.numel() - keep)[1] if keep < real.numel() else 0)
    device = valid.device
    return torch.tensor(kept, dtype=torch.long, device=device), torch.tensor(clusters, dtype=torch.long, device=device), scores


def cluster_and_merge(tokens: Tensor, clusters: int) -> tuple[Tensor, Tensor, Tensor]:
    """SparseVLM's density-peak clustering and merge of one row's recycled tokens (``utils.py``
    ``cluster_and_merge``), without the official random noise.

    ``dist = ||x_i - x_j|| / sqrt(C)`` from the differences (`pairwise_distances`); ``density = exp(-mean(k
    smallest dist^2))`` with k = ``clusters`` (self included); each token's parent distance = its distance to the
    nearest denser token (the row's largest distance when none is denser); centres = the ``clusters`` tokens with
    the largest ``parent distance * density`` (descending; ties to the earlier token); every token joins its
    nearest centre (ties to the earlier centre), centres themselves; merged = ``sum(x_i * (1 / (size + 1e-6)))``
    (official order: each token weighted, then summed in token order).

    Args:
        tokens: (M, C), in the official order (descending recycling score).
        clusters: 1 <= clusters <= M.
    Returns: merged (clusters, C) in centre order, centres (clusters,) long indices into ``tokens``, assignment
        (M,) long cluster of every token.
    """
    m, width = tokens.shape
    if not 1 <= clusters <= m:
        raise ValueError(f"clusters must be in [1, {m}], got {clusters}")
    x = tokens.float()
    dist = pairwise_distances(x) / math.sqrt(width)  # (M, M)
    nearest = torch.topk(dist, clusters, dim=1, largest=False).values  # (M, k) ascending, as official
    density = torch.exp(-(nearest**2).mean(dim=1))  # (M,)
    denser = density.unsqueeze(0) > density.unsqueeze(1)  # (M, M): [i, j] = density[j] > density[i]
    parent = torch.where(denser, dist, dist.max()).min(dim=1).values  # (M,)
    score = parent * density  # (M,)
    centres = torch.sort(score, descending=True, stable=True).indices[:clusters]  # (k,)
    assignment = dist[centres].argmin(dim=0)  # (M,): first minimal centre
    assignment[centres] = torch.arange(clusters, device=tokens.device)
    sizes = torch.bincount(assignment, minlength=clusters).float() + MERGE_EPS  # (k,): all_weight + 1e-6
    weights = sizes.reciprocal()[assignment].unsqueeze(1)  # (M, 1): 1 / (size + 1e-6) of each token's cluster
    merged = torch.zeros(clusters, width, dtype=torch.float32, device=tokens.device)  # (k, C)
    merged.index_add_(0, assignment, x * weights)  # (k, C): sum of the weighted tokens, in token order
    return merged, centres, assignment


def pairwise_distances(x: Tensor) -> Tensor:
    """(M, M) fp32 Euclidean distances of the rows of ``x`` (M, C), from the differences ``x_i - x_j`` as the
    official ``(x1 - x2).norm(dim=-1, p=2)`` does (never the ``|x|^2 + |y|^2 - 2 x.y`` matrix-product form, whose
    cancellation moves distances of large-norm hidden states by ~1e-3 relative).

    ``torch.pdist`` computes each unordered pair once from its differences (within an ulp of the official norm,
    and an order of magnitude faster on a CPU than ``cdist``'s exact mode); the matrix is its mirror, 0 on the
    diagonal.
    """
    m = x.shape[0]
    upper = torch.ones(m, m, dtype=torch.bool, device=x.device).triu(1)  # (M, M): i < j
    dist = torch.zeros(m, m, dtype=torch.float32, device=x.device)  # (M, M)
    if m > 1:
        dist.masked_scatter_(upper, torch.pdist(x.float()))  # pdist's pair order is the mask's row-major order
    return dist + dist.T  # one of each pair is 0: the sum is exact


def recycle(
    visual: Tensor, scores: Tensor, deleted: Tensor, clusters: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """SparseVLM's token recycling on each row's deleted tokens.

    Args:
        visual: (B, N, D) the tokens (the sparse layer's output hidden states).
        scores: (B, N) the raters' mean attention.
        deleted: (B, N) bool, the real tokens the rank rule pruned.
        clusters: (B,) long, clusters per row (`recycle_counts`; 0 = recycle nothing).
    Returns: keep (B, N) bool at each cluster's centre position, values (B, N, D) fp32 the merged value at that
        position, assignment (B, N) long: the centre position each recycled token went into, -1 for the others.
    Recycled = the top ``int(0.3 n) + 1`` deleted tokens by score (descending, ties to the lower position).
    """
    batch, tokens, _ = visual.shape
    keep = torch.zeros(batch, tokens, dtype=torch.bool, device=visual.device)
    values = torch.zeros(visual.shape, dtype=torch.float32, device=visual.device)
    assignment = torch.full((batch, tokens), -1, dtype=torch.long, device=visual.device)
    for b in range(batch):
        k = int(clusters[b])
        positions = deleted[b].nonzero().flatten()  # ascending
        if k <= 0 or positions.numel() == 0:
            continue
        recycled, _ = recycle_counts(positions.numel())
        order = torch.sort(scores[b, positions].float(), descending=True, stable=True).indices[:recycled]
        chosen = positions[order]  # (m,) in the official order
        merged, centres, member = cluster_and_merge(visual[b, chosen], min(k, chosen.numel()))
        centre_positions = chosen[centres]  # (k,)
        keep[b, centre_positions] = True
        values[b, centre_positions] = merged
        assignment[b, chosen] = centre_positions[member]
    return keep, values, assignment

