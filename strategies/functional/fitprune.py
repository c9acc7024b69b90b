"""FitPrune (Ye et al., AAAI 2025, arXiv 2409.10197): a per-layer pruning recipe fitted on attention statistics.

Official code: github.com/ywh187/FitPrune @ d28e418c920912b20dc888325651ecc6e214e6a1,
``LLaVA_1.5/llava/model/language_model/modeling_llama.py`` (``LlamaAttention.forward``, the "fitprune" block: the
inference ranking) and ``LLaVA_1.5/llava/eval/statistical_analysis.py`` (``compute_attention_weights``,
``fit_model``, ``rest_flops``, ``calculate_origin_flops``, ``statistical_analysis``: the recipe search).

Rules reproduced (A = a layer's softmax attention, max over heads, rows = queries, columns = keys):

* Inference, at layer l with ``d_l`` deletions in the recipe: ``self_j = sum_i A[v_i, v_j] / n`` over the n visual
  queries, ``cross_j = sum_t A[t, v_j]`` over the text tokens after the image; the ``d_l`` first entries of
  ``torch.sort(cross * self)`` (ascending) are deleted after layer l's attention (so they are keys of layer l and
  gone from layer l + 1 on).
* Fitting, per calibration sample and layer: ``W_cross = sum A[text, vis] / T`` and ``W_self = sum A[vis, vis] / n``
  from the unpruned model; with ``alpha``, a ranking ``w`` (ascending sort) deletes ``max(i - 1, 0)`` tokens where i
  is the first count whose removal leaves ``sum(w) - sum(first i) < W - alpha * W`` (float arithmetic as official); the sample deletes the tokens
  in both the cross and the self deletion sets; the recipe is ``floor(sum over samples / samples)`` per layer; the
  layers from the first one whose FLOPs forecast meets ``(1 - reduction) * original`` on keep 0.
* ``alpha`` by bisection on [0, 1] until the bracket is at most 0.01 wide: a budget met moves the upper end down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .common import mask_from_positions, per_row_counts, valid_rows

__all__ = [
    "FitResult",
    "FlopModel",
    "fitprune_scores",
    "fitprune_sort_drop",
    "fitprune_sort_drop_indices",
    "fitprune_layer_totals",
    "fitprune_deletion_count",
    "fitprune_sample_deletions",
    "fitprune_scheme",
    "fitprune_search",
    "fitprune_keep_ratios",
    "ALPHA_TOLERANCE",
]

#: The official bisection stops once ``max_alpha - min_alpha <= 0.01 + 1e-6`` (statistical_analysis.py).
ALPHA_TOLERANCE = 0.01 + 1e-6


def fitprune_scores(
    prompt_attention: Tensor,
    visual_attention: Tensor,
    valid: Optional[Tensor] = None,
    prompt_mask: Optional[Tensor] = None,
) -> Tensor:
    """(B, N) float32 FitPrune ranking score ``cross * self`` (low = deleted first).

    Args:
        prompt_attention: (B, H, T, N) softmax attention of the prompt (text after the image) rows to the visual
            tokens at the scoring layer.
        visual_attention: (B, H, N, N) softmax attention of the visual query rows (dim 2) to the visual keys (dim 3).
        valid: (B, N) bool real visual tokens, or None (all real).
        prompt_mask: (B, T) bool real prompt rows, or None (all real).

    Each row is reduced on its own valid slice (so a row scores the same alone as in a padded batch): max over
    heads, then ``self = (A_vv / n).sum(queries)`` and ``cross = A_tv.sum(text rows)`` in the official op order.
    Padding positions score 0.
    """
    batch, _, _, tokens = prompt_attention.shape
    out = torch.zeros(batch, tokens, dtype=torch.float32, device=prompt_attention.device)  # (B, N)
    for b, pos in enumerate(valid_rows(valid, batch, tokens, prompt_attention.device)):
        cross_rows = prompt_attention[b].float().amax(dim=0)  # (T, N)
        if prompt_mask is not None:
            cross_rows = cross_rows[prompt_mask[b]]  # (T_b, N)
        own = visual_attention[b].float().amax(dim=0)  # (N, N)
        if pos is not None:
            cross_rows, own = cross_rows[:, pos], own[pos][:, pos]  # (T_b, n), (n, n)
        n = own.shape[0]
        self_part = (own / n).sum(dim=0)  # (n,)
        cross = cross_rows.sum(dim=0)  # (n,)
        score = cross * self_part  # (n,)
        if pos is None:
            out[b] = score
        else:
            out[b, pos] = score
    return out


def fitprune_sort_drop(scores: Tensor, counts, valid: Optional[Tensor] = None) -> Tensor:
    """(B, N) bool keep mask: each row keeps ``counts[b]`` tokens by deleting the first ``n_b - counts[b]`` entries
    of ``torch.sort(scores)`` (ascending) on its valid slice, the official call (its tie order included)."""
    batch, tokens = scores.shape
    kept = []
    for b, (pos, k) in enumerate(zip(valid_rows(valid, batch, tokens, scores.device), per_row_counts(counts, batch))):
        row = scores[b] if pos is None else scores[b, pos]  # (n_b,)
        n = row.shape[0]
        deleted = torch.sort(row, dim=-1).indices[: max(0, n - max(0, min(k, n)))]  # (n_b - k,)
        keep = torch.ones(n, dtype=torch.bool, device=scores.device)
        keep[deleted] = False
        chosen = keep.nonzero().flatten()  # (k,)
        kept.append(chosen if pos is None else pos[chosen])
    return mask_from_positions(kept, batch, tokens, scores.device)


def fitprune_sort_drop_indices(scores: Tensor, count: int) -> Tensor:
    """(B, count) long, ascending: the index form of `fitprune_sort_drop` for rows without padding and one count.

    Each row's kept tokens are the last ``count`` entries of the same ``torch.sort`` call on the same row (the
    complement of the ``n - count`` deleted first), so ties fall as in the mask form. ``0 <= count <= N``.
    """
    tokens = scores.shape[1]
    kept = [torch.sort(row, dim=-1).indices[tokens - count :] for row in scores]  # B x (count,)
    chosen = kept[0].unsqueeze(0) if len(kept) == 1 else torch.stack(kept)  # (B, count)
    return chosen.sort(dim=1).values  # (B, count)


def fitprune_layer_totals(prompt_rows: Tensor, visual_rows: Tensor) -> tuple[float, float]:
    """``(W_cross, W_self)`` of one sample at one layer of the unpruned model (``compute_attention_weights``).

    Args:
        prompt_rows: (H, T, n) attention of the T text tokens after the image to the n visual tokens.
        visual_rows: (H, n, n) attention among the visual tokens (rows = queries).
    """
    cross = prompt_rows.float().amax(dim=0)  # (T, n)
    own = visual_rows.float().amax(dim=0)  # (n, n)
    return float(cross.sum()) / max(cross.shape[0], 1), float(own.sum()) / max(own.shape[0], 1)


def fitprune_deletion_count(weights: Tensor, total: float, alpha: float) -> int:
    """How many of the lowest ``weights`` (n,) one criterion deletes (``fit_model``'s loops).

    The first i in 0..n-1 with ``sum(weights) - sum(i smallest) < total - alpha * total`` gives ``max(i - 1, 0)``,
    with the official arithmetic: each prefix summed afresh in the weights' dtype, the target rounded to it (at
    ``alpha = 0`` a removal too small to change the float sum is free, as in the official run). Where no i
    qualifies the official loop leaves the previous sample's count in place (a stale variable, or a NameError on the
    first); here the rule's own continuation applies, i = n: ``n - 1`` (docs/methods.md).
    """
    order = torch.argsort(weights)  # (n,) ascending
    whole = weights.sum()
    target = total - total * alpha
    for i in range(order.shape[0]):
        if bool((whole - weights[order[:i]].sum()) < target):
            return max(i - 1, 0)
    return max(order.shape[0] - 1, 0)


def fitprune_sample_deletions(
    prompt_rows: Tensor, visual_rows: Tensor, totals: tuple[float, float], alpha: float
) -> Tensor:
    """(n,) bool: the visual tokens one calibration sample deletes at one layer while fitting.

    Args:
        prompt_rows: (H, T, n), visual_rows: (H, n, n): the layer's attention in the (pruned) fitting run.
        totals: the sample's ``(W_cross, W_self)`` at this layer in the unpruned model (`fitprune_layer_totals`).
        alpha: the fraction of each total the deletions may remove.
    Returns the intersection of the cross and the self deletion sets (``fit_model``).
    """
    cross = prompt_rows.float().amax(dim=0).sum(dim=0) / max(prompt_rows.shape[1], 1)  # (n,)
    n = visual_rows.shape[-1]
    own = (visual_rows.float().amax(dim=0) / n).sum(dim=0)  # (n,)
    delete = torch.zeros(n, dtype=torch.bool, device=cross.device)
    by_cross = torch.argsort(cross)[: fitprune_deletion_count(cross, totals[0], alpha)]
    by_self = torch.argsort(own)[: fitprune_deletion_count(own, totals[1], alpha)]
    in_cross = torch.zeros_like(delete)
    in_cross[by_cross] = True
    delete[by_self] = True
    return delete & in_cross  # (n,)


@dataclass(frozen=True)
class FlopModel:
    """FitPrune's FLOPs count of the visual tokens in a decoder of ``layers`` layers (``rest_flops``): per layer,
    q/k/v ``3 t D^2``, scores and values ``2 t^2 D``, output ``t D^2`` and the gated MLP ``3 t D I`` for t tokens.
    The official code hard-codes LLaVA-1.5-7B (D = 4096, I = 11008, 32 layers); these come from the model config."""

    hidden: int
    intermediate: int
    layers: int

    def attention(self, tokens: int) -> int:
        """q/k/v projections and the two attention products of one layer."""
        return tokens * self.hidden**2 * 3 + tokens**2 * self.hidden * 2

    def tail(self, tokens: int) -> int:
        """Output projection and MLP of one layer."""
        return tokens * self.hidden**2 + 3 * self.intermediate * self.hidden * tokens

    def rest(self, tokens: int, layer: int) -> int:
        """``rest_flops``: this layer's tail plus every later layer in full, at ``tokens``."""
        return self.tail(tokens) + (self.attention(tokens) + self.tail(tokens)) * (self.layers - 1 - layer)

    def full(self, tokens: int) -> int:
        """``calculate_origin_flops``: every layer in full at ``tokens``."""
        return (self.attention(tokens) + self.tail(tokens)) * self.layers


def fitprune_scheme(
    deleted: Sequence[Sequence[int]], start: Sequence[int], flops: FlopModel, reduction: float
) -> tuple[bool, list[int]]:
    """``fit_model``'s bookkeeping: the recipe from every sample's per-layer deletions.

    Args:
        deleted: per sample, the tokens it deleted at each of the ``flops.layers`` layers when pruned at every layer.
            Pruning at a layer never changes an earlier layer, so the official early stop (no pruning from the
            first layer whose forecast meets the budget on) is the prefix of these runs.
        start: per sample, its visual tokens before layer 0.
        reduction: the FLOPs fraction to remove (official ``reduction_ratio``, e.g. 0.6).
    Returns ``(budget met, per-layer deletions)``: ``floor(sum / samples)`` per layer, 0 from the stopping layer on.
    """
    samples = len(start)
    origin = sum(flops.full(n) for n in start) / samples  # the official 576-token model for LLaVA-1.5
    left = [int(n) for n in start]
    used = 0
    scheme = [0] * flops.layers
    for layer in range(flops.layers):
        forecast = 0
        for n in left:
            used += flops.attention(n)
            forecast += flops.rest(n, layer)
        if (used + forecast) / samples <= origin * (1 - reduction):
            return True, [total // samples for total in scheme]
        for s in range(samples):
            gone = int(deleted[s][layer])
            scheme[layer] += gone
            left[s] -= gone
            used += flops.tail(left[s])
    return False, [total // samples for total in scheme]


@dataclass(frozen=True)
class FitResult:
    """A fitted recipe: per-layer deletions at ``alpha``; ``reached``: the FLOPs budget is met."""

    alpha: float
    reached: bool
    scheme: tuple[int, ...]
    probes: tuple[tuple[float, bool], ...]


def fitprune_search(
    evaluate: Callable[[float], tuple[bool, list[int]]], tolerance: float = ALPHA_TOLERANCE, pick: str = "feasible"
) -> FitResult:
    """The official bisection over ``alpha`` in [0, 1].

    ``evaluate(alpha) -> (budget met, scheme)`` (`fitprune_scheme` over the calibration runs at alpha; monotone:
    a larger alpha deletes more). ``pick="last"`` returns the last probed scheme as the official script prints it
    (which misses the budget whenever the last probe did); ``pick="feasible"`` (default) the scheme at the final
    upper end, the smallest probed alpha that meets the budget (evaluated at 1.0 when none did).
    """
    if pick not in ("feasible", "last"):
        raise ValueError(f"pick must be 'feasible' or 'last', got {pick!r}")
    low, high = 0.0, 1.0
    seen: dict[float, tuple[bool, list[int]]] = {}
    probes = []
    last = None
    while high - low > tolerance:
        mid = (low + high) / 2
        seen[mid] = evaluate(mid)
        probes.append((mid, seen[mid][0]))
        last = mid
        if seen[mid][0]:
            high = mid
        else:
            low = mid
    alpha = last if pick == "last" and last is not None else high
    if alpha not in seen:
        seen[alpha] = evaluate(alpha)
    reached, scheme = seen[alpha]
    return FitResult(alpha, reached, tuple(int(d) for d in scheme), tuple(probes))


def fitprune_keep_ratios(scheme: Sequence[int], tokens: int) -> tuple[int, tuple[float, ...]]:
    """A recipe's per-layer deletions as the ``fitprune`` placement's parameters.

    Returns ``(first, ratios)``: ``first`` = tokens kept after layer 0 (the requested budget that reproduces the
    recipe), ``ratios[l - 1]`` = the kept fraction of the tokens present after layer l (l >= 1), so that a fraction
    budget rounded half up keeps exactly ``present - scheme[l]`` when the image has ``tokens`` tokens.
    """
    if tokens < 1 or any(int(d) < 0 for d in scheme):
        raise ValueError(f"tokens must be >= 1 and deletions >= 0, got tokens={tokens}, scheme={list(scheme)}")
    if sum(int(d) for d in scheme) >= tokens:
        raise ValueError(f"the recipe deletes {sum(scheme)} of {tokens} tokens: at least one must stay")
    present = tokens - int(scheme[0]) if scheme else tokens
    ratios = []
    for deleted in scheme[1:]:
        ratios.append((present - int(deleted)) / present)
        present -= int(deleted)
    return tokens - (int(scheme[0]) if scheme else 0), tuple(ratios)
