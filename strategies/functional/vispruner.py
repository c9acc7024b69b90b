"""VisPruner (Zhang et al., ICCV 2025): important tokens by [CLS] attention + diverse tokens.

Official code: github.com/Theia-4869/VisPruner @ aefa01adc7c7ce6334e880c88225e90cede760d1,
``llava/model/llava_arch.py`` (``LlavaMetaForCausalLM.encode_images``) and
``llava/model/multimodal_encoder/clip_encoder.py`` (``feature_select``: patch features and the CLS
row ``attentions[select_layer][:, :, 0, 1:]`` of the same layer, select_layer = -2).

Rules reproduced:
* ``T_imp = int(T * important_ratio)`` (default ratio 0.5), ``T_div = T - T_imp``.
* important: ``cls_attention.mean(dim=1)`` (MEAN over heads), ``argsort(descending=True)``; the
  first T_imp are important, the rest (in that descending order) are the residual.
* diverse: on L2-normalised vision features (no epsilon), repeat while ``T_div > 0``:
  ``R = len(residual)``, ``r = min(8, R - T_div)``, stop if ``r <= 0``; split the residual into
  a = residual[0::2], b = residual[1::2]; score each a by ``max_j cos(a, b_j)``; drop the r
  highest-scoring a's: the new residual is ``a[argsort(score, descending=True)[r:]]`` (in that
  order) followed by all b's (original order). The order matters for the next round.
* keep = important + final residual (``T_div == 0`` keeps important only).
Deviation: for odd R the official batched gather ``expand(-1, R // 2 - r)`` mis-broadcasts or
raises; here a has ceil(R/2) members and all ``ceil(R/2) - r`` survivors are kept.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .common import CountLike, mask_from_positions, per_row_counts, row_positions, valid_or_all

__all__ = ["vispruner_counts", "vispruner_select", "vispruner_dedup", "vispruner_supplement"]


def vispruner_counts(total: int, important_ratio: float = 0.5) -> tuple[int, int]:
    """Official split ``(int(total * important_ratio), total - int(total * important_ratio))``."""
    important = int(total * important_ratio)
    return important, total - important


def _vispruner_row(features: Tensor, scores: Tensor, total: int, important_ratio: float) -> Tensor:
    """Local indices kept for one row: features (n, C), scores (n,) head-mean CLS attention."""
    n_imp, n_div = vispruner_counts(total, important_ratio)
    order = scores.unsqueeze(0).argsort(dim=-1, descending=True)[0]  # (n,)
    important, residual = order[:n_imp], order[n_imp:]
    unit = features / features.norm(dim=-1, keepdim=True)  # (n, C)
    residual = vispruner_dedup(unit, residual, n_div)
    return torch.cat([important, residual]) if n_div > 0 else important


def vispruner_dedup(unit: Tensor, residual: Tensor, n_div: int) -> Tensor:
    """VisPruner's iterative duplicate removal: shrink ``residual`` (local indices into ``unit``,
    (n, C) unit vectors, in descending-attention order) to ``n_div`` tokens (official loop)."""
    while n_div > 0:
        size = int(residual.numel())
        r = min(8, size - n_div)
        if r <= 0:
            break
        tokens = unit[residual]  # (R, C)
        a, b = tokens[0::2, :], tokens[1::2, :]
        sim = (a @ b.transpose(-1, -2)).max(dim=-1).values  # (ceil(R/2),)
        distinct = sim.unsqueeze(0).argsort(dim=-1, descending=True)[0, r:]
        residual = torch.cat([residual[0::2][distinct], residual[1::2]])
    return residual


def vispruner_select(
    visual: Tensor,
    cls_attention: Tensor,
    counts: CountLike,
    valid: Optional[Tensor] = None,
    important_ratio: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """VisPruner keep mask.

    Args:
        visual: (B, N, C) vision-encoder patch features (penultimate layer, pre-projector).
        cls_attention: (B, H, N) CLS-to-patch attention of the same layer.
        counts: int or (B,) total kept ``visual_token_num`` T; clamped to the valid count.
        valid: (B, N) bool or None.
        important_ratio: official ``--important_ratio`` (default 0.5).

    Returns:
        keep: (B, N) bool; important: (B, N) bool, the important (critical) subset.
    """
    batch, tokens, _ = visual.shape
    valid = valid_or_all(valid, batch, tokens, visual.device)
    scores = cls_attention.mean(dim=1)  # (B, N)
    kept, imp = [], []
    for b, (pos, k) in enumerate(zip(row_positions(valid), per_row_counts(counts, batch))):
        k = max(0, min(k, int(pos.numel())))
        local = _vispruner_row(visual[b, pos], scores[b, pos], k, important_ratio)
        kept.append(pos[local])
        imp.append(pos[local[: vispruner_counts(k, important_ratio)[0]]])
    return (
        mask_from_positions(kept, batch, tokens, visual.device),
        mask_from_positions(imp, batch, tokens, visual.device),
    )


def vispruner_supplement(
    visual: Tensor,
    scores: Optional[Tensor],
    selected: Tensor,
    counts: CountLike,
    valid: Optional[Tensor] = None,
) -> Tensor:
    """VisPruner's diverse tokens given the important set: ``counts[b]`` more tokens per row.

    The residual is the row's valid slice in ``argsort(scores, descending=True)`` order (the
    official op; positional order when ``scores`` is None) without the ``selected`` tokens; it is
    shrunk with :func:`vispruner_dedup` to exactly ``counts[b]`` tokens.
    """
    batch, tokens, _ = visual.shape
    valid = valid_or_all(valid, batch, tokens, visual.device)
    kept = []
    for b, (pos, k) in enumerate(zip(row_positions(valid), per_row_counts(counts, batch))):
        n = int(pos.numel())
        taken = selected[b, pos]
        k = max(0, min(k, n - int(taken.sum())))
        if k == 0:
            kept.append(pos[:0])
            continue
        if scores is None:
            order = torch.arange(n, device=visual.device)
        else:
            order = scores[b, pos].unsqueeze(0).argsort(dim=-1, descending=True)[0]  # (n,)
        residual = order[~taken[order]]
        features = visual[b, pos]
        unit = features / features.norm(dim=-1, keepdim=True)  # (n, C)
        kept.append(pos[vispruner_dedup(unit, residual, k)])
    return mask_from_positions(kept, batch, tokens, visual.device)
