"""FlowCut (Tong et al., NeurIPS 2025, arXiv 2505.19536): progressive pruning inside a CLIP-style vision tower by the
CLS token's information flow.

Official code: github.com/TungChintao/FlowCut @ a2ecd247cb3c605773ec317a0c246425b47abdbe, LLaVA-1.5 path:

* ``flowcut/modeling_clip_flowcut.py`` ``CLIPAttention_forward``: besides the attention, each layer returns the
  head-mean of ``softmax(v_cls . v_j)`` (the CLS value's similarity to every value, unscaled, per head) and the
  head-mean value states; ``CLIPEncoderLayer_forward`` (after the MLP): while the layer's output holds more than
  ``target`` tokens (CLS counted), score the patches, blend the score into the running one (``0.5 * old + 0.5 *
  new``, the first scoring layer's score as is) and, at every layer whose ``rpl`` (``select_layer - idx - 1``) is even,
  keep the CLS token and the ``target_num - 1`` patches of highest running score, in ascending position order;
  ``CLIPEncoder_forward`` passes ``rpl``; ``apply_flowcut_config`` sets ``select_layer = len(layers) - 2`` (LLaVA's
  feature layer -2).
* ``flowcut/utils_flowcut.py`` ``compute_score``: ``(a / a.sum + s / s.sum) * ||v||_1`` with ``a`` the head-mean CLS
  attention to the patches, ``s`` the head-mean value similarity and ``v`` the head-mean value of each patch;
  ``adaptive_prune_ratio``: ``r = (N - (target - 1)) / sqrt(rpl) * (1 - (H / log N) ** 2)`` with ``H`` the entropy of
  the normalised CLS attention over the ``N`` present patches, rounded (``torch.round``: half to even); at
  ``rpl == 0`` every patch is asked to go, so that layer leaves exactly ``target`` tokens.

By default each row keeps its own count, so rows may be ragged between pruning layers: ``valid`` marks the present
patches, padding is never scored, counted or kept. With ``shared=True`` (stage parameter ``count='batch'``) every row
prunes the official batch count instead (``r.max(0)``: the largest unrounded count of the rows above the target,
then rounded), so rows stay equal-length as officially and a row's result depends on its batch-mates (see
docs/methods.md, "FlowCut"). Scores are computed in float32.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "flowcut_layer_terms",
    "flowcut_scores",
    "flowcut_accumulate",
    "flowcut_prune_counts",
    "flowcut_keep",
    "flowcut_remaining",
    "flowcut_prunes_at",
    "flowcut_layer_step",
]


def flowcut_remaining(feature_layer: int, layer: int) -> int:
    """The official ``rpl`` of encoder layer ``layer`` (0-based) when ``feature_layer`` is the layer whose output the
    model reads (``select_layer - idx - 1``): 0 at the layer before the feature layer, which prunes to the target."""
    return feature_layer - layer - 1


def flowcut_prunes_at(remaining: int) -> bool:
    """Whether a layer with ``rpl == remaining`` prunes (``not rpl % 2``; negative ``rpl`` never has tokens above the
    target, since ``rpl == 0`` leaves exactly the target)."""
    return remaining >= 0 and remaining % 2 == 0


def flowcut_layer_terms(
    queries: Tensor, keys: Tensor, values: Tensor, heads: int, scale: float, present: Optional[Tensor] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer's FlowCut signals from its own projections (CLS token at position 0).

    Args:
        queries, keys, values: (B, t, D) outputs of the layer's ``q_proj`` / ``k_proj`` / ``v_proj``.
        heads: attention heads (D = heads * head_dim).
        scale: the attention's query scale (``head_dim ** -0.5`` in CLIP), applied to the queries first as the
            official code does.
        present: (B, t) bool, the tokens of each row (padding of a ragged batch False), or None (all present).

    Returns:
        relation: (B, t - 1) float32 head-mean softmax attention of the CLS query to each patch (0 at padding).
        semantic: (B, t - 1) float32 head-mean softmax over the tokens of ``v_cls . v_j`` per head (0 at padding).
        value: (B, t - 1, head_dim) float32 head-mean value state of each patch.
    """
    batch, tokens, width = values.shape
    head_dim = width // heads
    q = (queries.float() * scale).view(batch, tokens, heads, head_dim).transpose(1, 2)  # (B, H, t, hd)
    k = keys.float().view(batch, tokens, heads, head_dim).transpose(1, 2)  # (B, H, t, hd)
    v = values.float().view(batch, tokens, heads, head_dim).transpose(1, 2)  # (B, H, t, hd)
    logits = q[:, :, :1] @ k.transpose(-2, -1)  # (B, H, 1, t): the CLS row of the attention logits
    similar = v[:, :, :1] @ v.transpose(-2, -1)  # (B, H, 1, t): CLS value . every value, unscaled
    if present is not None:
        absent = ~present[:, None, None, :]  # (B, 1, 1, t)
        logits = logits.masked_fill(absent, float("-inf"))
        similar = similar.masked_fill(absent, float("-inf"))
    relation = logits.softmax(dim=-1)[:, :, 0, 1:].mean(dim=1)  # (B, t - 1)
    semantic = similar.softmax(dim=-1)[:, :, 0].mean(dim=1)[:, 1:]  # (B, t - 1)
    return relation, semantic, v.mean(dim=1)[:, 1:]  # (B, t - 1, hd)


def flowcut_scores(relation: Tensor, semantic: Tensor, value: Tensor) -> Tensor:
    """(B, n) FlowCut score of each patch: ``(relation share + semantic share) * ||value||_1`` (official
    ``compute_score``); ``relation`` / ``semantic`` (B, n) are 0 at padding, ``value`` (B, n, hd)."""
    relation_share = relation / relation.sum(dim=-1, keepdim=True)  # (B, n)
    semantic_share = semantic / semantic.sum(dim=-1, keepdim=True)  # (B, n)
    return (relation_share + semantic_share) * value.abs().sum(dim=-1)  # (B, n)


def flowcut_accumulate(running: Optional[Tensor], scores: Tensor) -> Tensor:
    """(B, n) running score: the first scoring layer's score, then ``0.5 * running + 0.5 * scores``."""
    if running is None:
        return scores.clone()
    return 0.5 * running + 0.5 * scores


def flowcut_prune_counts(
    relation: Tensor, valid: Tensor, remaining: int, keep_patches: int, shared: bool = False
) -> Tensor:
    """(B,) long: patches each row asks to prune at a layer with ``rpl == remaining`` (official
    ``adaptive_prune_ratio``): ``round((n - keep_patches) / sqrt(remaining) * (1 - (H / log n) ** 2))`` with ``n`` the
    row's present patches and ``H`` the entropy of its normalised CLS attention ``relation`` (B, n) over them; every
    present patch at ``remaining == 0``. ``keep_patches`` is the target without the CLS token. A row already at the
    target asks 0 (officially a lone image at the target is not scored at all; in a ragged batch its batch-mates may
    still be above it).

    ``shared=False``: each row's own count. ``shared=True``: the official batch count, every row above the target
    asks the largest unrounded count of those rows, rounded once (``r.max(0)`` then ``round``), so a row's count
    depends on its batch-mates (officially every row holds the same ``n``; a ragged batch is not an official case).
    """
    n = valid.sum(dim=1)  # (B,)
    if remaining == 0:
        return n
    above = n > keep_patches  # (B,)
    prob = relation / relation.sum(dim=-1, keepdim=True)  # (B, n)
    plogp = torch.where(valid, prob * prob.log(), torch.zeros_like(prob))  # (B, n): padding contributes nothing
    entropy = -plogp.sum(dim=-1)  # (B,)
    ratio = entropy / n.clamp(min=2).float().log()  # (B,): n >= 2 wherever a row is above a target of >= 1 patch
    spread = ((n - keep_patches).double() / math.sqrt(remaining)).float()  # (B,): the official Python-float quotient
    asked = spread * (1 - ratio**2)  # (B,)
    if shared:  # the official r.max(0), before rounding, over the rows still above the target
        peak = asked.masked_fill(~above, float("-inf")).amax(dim=0, keepdim=True)  # (1,)
        asked = torch.where(above, peak.expand_as(asked), asked)  # (B,)
    return torch.where(above, asked.round().long(), torch.zeros_like(n))


def flowcut_keep(running: Tensor, valid: Tensor, prune: Tensor, keep_patches: int) -> tuple[Tensor, Tensor]:
    """The patches each row keeps at a pruning layer: its ``max(n - prune, keep_patches)`` patches of highest running
    score, in ascending position order (official ``topk`` then ``sort``).

    Args:
        running: (B, n) running scores; valid: (B, n) bool present patches; prune: (B,) long asked counts;
        keep_patches: the target without the CLS token (every row holds at least that many).

    Returns:
        index: (B, k) long positions among the current patches (padding slots 0), k = the largest kept count;
        kept: (B, k) bool, True at real slots.
    """
    counts = torch.clamp(valid.sum(dim=1) - prune, min=keep_patches)  # (B,)
    width = int(counts.max())
    ranked = running.masked_fill(~valid, float("-inf")).topk(width, dim=1).indices  # (B, k), best first
    kept = torch.arange(width, device=running.device)[None, :] < counts[:, None]  # (B, k)
    sentinel = running.shape[1]
    ordered = torch.where(kept, ranked, torch.full_like(ranked, sentinel)).sort(dim=1).values  # (B, k) ascending
    return torch.where(kept, ordered, torch.zeros_like(ordered)), kept


def flowcut_layer_step(
    hidden: Tensor,
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    heads: int,
    scale: float,
    running: Optional[Tensor],
    positions: Tensor,
    present: Optional[Tensor],
    remaining: int,
    target: int,
    shared: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """FlowCut at the end of one encoder layer whose output ``hidden`` (B, t, D) holds more than ``target`` tokens
    (CLS counted): score the patches from the layer's projections (B, t, D) each, blend the running score and, when
    the layer's ``rpl`` (``remaining``) is even, keep each row's patches (`flowcut_prune_counts`, `flowcut_keep`).

    Args:
        running: (B, n) running score or None (first scoring layer); positions: (B, n) long original patch index of
            every current slot; present: (B, t) bool real tokens (CLS first) or None when no row is padded.
        shared: every row prunes the batch's count (`flowcut_prune_counts`; the official ``r.max(0)``): rows stay
            equal-length, no padding arises.

    Returns:
        ``(hidden, running, positions, present, kept)``: the layer's output (B, 1 + k, D) after pruning (CLS first,
        kept patches ascending) or as given, the running scores and positions of its slots, its padding mask (None
        when no row is padded) and the (B,) patches kept per row (None when the layer does not prune).
    """
    batch, tokens = hidden.shape[:2]
    valid = present[:, 1:] if present is not None else torch.ones(batch, tokens - 1, dtype=torch.bool, device=hidden.device)
    relation, semantic, value = flowcut_layer_terms(queries, keys, values, heads, scale, present)  # (B, n) x2, (B, n, hd)
    running = flowcut_accumulate(running, flowcut_scores(relation, semantic, value))  # (B, n)
    if not flowcut_prunes_at(remaining):
        return hidden, running, positions, present, None
    prune = flowcut_prune_counts(relation, valid, remaining, target - 1, shared)  # (B,)
    index, kept = flowcut_keep(running, valid, prune, target - 1)  # (B, k)
    rows = torch.arange(batch, device=hidden.device)[:, None]  # (B, 1)
    present = None if bool(kept.all()) else torch.cat([kept.new_ones(batch, 1), kept], dim=1)  # (B, 1 + k)
    hidden = torch.cat([hidden[:, :1], hidden[:, 1:][rows, index]], dim=1)  # (B, 1 + k, D)
    return hidden, running[rows, index], positions[rows, index], present, kept.sum(dim=1)
