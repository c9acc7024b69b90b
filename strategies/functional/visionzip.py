"""VisionZip (Yang et al., CVPR 2025): dominant + contextual visual tokens in the vision encoder.

Official code: github.com/dvlab-research/VisionZip @ 3151f6df4fca36a4cd1c985e5956e725b1f9ad02,
``visionzip/clip_encoder.py`` (``CLIPVisionTower_VisionZip.forward``), ``visionzip/utils.py``
(``CLIPAttention_forward`` returns ``metric = raw_key_states.mean(1)``: the layer's key states
averaged over heads), ``visionzip/main.py`` (``visionzip(model, dominant, contextual)`` calls
``apply_info(dominant_num=dominant - 1, ...)``; README default ``dominant=54, contextual=10``).

Rules reproduced (all at the penultimate CLIP layer: ``hidden_states[-2]``, ``attentions[-2]``,
``layers[-2].metric``):
* dominant: ``cls_attention.sum(dim=1)`` (SUM over heads) then ``topk(dominant_num)``. The
  official output also keeps the CLS token itself as the first dominant token, so official
  ``dominant=54`` = CLS + 53 patches. Our ``visual`` holds patches only (CLS excluded), so
  ``dominant`` here counts PATCHES: pass 53 to reproduce the official 54 (the CLS hidden state
  cannot be represented by a patch keep mask; see docs/peers-notes.md).
* remaining tokens (positional order) -> ``metric / metric.norm(dim=-1, keepdim=True)``;
  ``step = max(1, R // contextual)``; centres = ``arange(0, R, step)[:contextual]`` (indices into
  the remaining tokens).
* each non-centre remaining token goes to ``argmax`` (first max) of its dot product with the
  normalised centre metrics (cosine of head-averaged keys).
* contextual value = ``centre_hidden + sum(assigned hidden) / max(count, 1)`` (the centre itself
  is NOT part of the mean; the mean is added to it). Computed in the hidden-state dtype.
* official token order sent to the LLM: [CLS, dominant patches ascending, contextual centres
  ascending]; the returned ``dominant`` mask lets a caller rebuild that order.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .common import CountLike, per_row_counts, row_positions, valid_or_all

__all__ = ["visionzip_select", "visionzip_contextual"]


def visionzip_select(
    visual: Tensor,
    cls_attention: Tensor,
    visual_keys: Tensor,
    dominant: CountLike = 53,
    contextual: CountLike = 10,
    valid: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """VisionZip selection and merge.

    Args:
        visual: (B, N, D) patch hidden states of the penultimate vision layer (CLS excluded).
        cls_attention: (B, H, N) CLS-to-patch attention of that layer.
        visual_keys: (B, N, Hk, dk) that layer's key states (averaged over heads here), or an
            already head-averaged (B, N, dk) metric.
        dominant: int or (B,) patches kept by CLS attention (official dominant - 1).
        contextual: int or (B,) contextual (merged) tokens; clamped to the remaining count.
        valid: (B, N) bool or None.

    Returns:
        keep: (B, N) bool, dominant patches and contextual centres.
        values: (B, N, D) ``visual`` with each contextual centre replaced by its merged value.
        dominant_mask: (B, N) bool, the dominant subset of ``keep``.
    """
    batch, tokens, _ = visual.shape
    valid = valid_or_all(valid, batch, tokens, visual.device)
    metric_all = visual_keys.mean(dim=2) if visual_keys.dim() == 4 else visual_keys  # (B, N, dk)
    scores_all = cls_attention.sum(dim=1)  # (B, N)
    dominant_mask = torch.zeros(batch, tokens, dtype=torch.bool, device=visual.device)
    dom_counts = per_row_counts(dominant, batch)
    for b, pos in enumerate(row_positions(valid)):
        n = int(pos.numel())
        n_dom = max(0, min(dom_counts[b], n))
        top = scores_all[b, pos].topk(n_dom).indices  # (n_dom,) local
        is_dom = torch.zeros(n, dtype=torch.bool, device=visual.device)
        is_dom[top] = True
        dominant_mask[b, pos[is_dom]] = True
    keep, values = visionzip_contextual(visual, metric_all, dominant_mask, contextual, valid)
    keep |= dominant_mask
    return keep, values, dominant_mask


def visionzip_contextual(
    visual: Tensor,
    visual_keys: Tensor,
    dominant: Tensor,
    contextual: CountLike,
    valid: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """VisionZip's contextual tokens given the dominant set (the merge half of :func:`visionzip_select`).

    Args:
        visual: (B, N, D) hidden states; visual_keys: (B, N, Hk, dk) or (B, N, dk) metric.
        dominant: (B, N) bool, the tokens already kept (excluded from the remaining tokens).
        contextual: int or (B,) contextual tokens per row; clamped to the remaining count.
        valid: (B, N) bool or None.

    Returns:
        keep: (B, N) bool, the contextual centres only (exactly ``min(contextual, remaining)``);
        values: (B, N, D) ``visual`` with each centre replaced by ``centre + mean(assigned)``.
    """
    batch, tokens, _ = visual.shape
    valid = valid_or_all(valid, batch, tokens, visual.device)
    metric_all = visual_keys.mean(dim=2) if visual_keys.dim() == 4 else visual_keys  # (B, N, dk)
    keep = torch.zeros(batch, tokens, dtype=torch.bool, device=visual.device)
    values = visual.clone()
    ctx_counts = per_row_counts(contextual, batch)
    for b, pos in enumerate(row_positions(valid & ~dominant)):
        rest = pos  # (R,) absolute, positional order
        n_rest = int(rest.numel())
        n_ctx = max(0, min(ctx_counts[b], n_rest))
        if n_ctx == 0:
            continue
        hidden = visual[b, rest].unsqueeze(0)  # (1, R, D)
        metric = metric_all[b, rest].unsqueeze(0)  # (1, R, dk)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        step = max(1, n_rest // n_ctx)
        arange = torch.arange(n_rest, device=visual.device)
        target = torch.arange(0, n_rest, step, device=visual.device)[:n_ctx]  # (c,)
        others = ~torch.isin(arange, target)  # (R,)
        similarity = torch.bmm(metric[:, others, :], metric[:, target, :].transpose(1, 2))  # (1, R-c, c)
        assign = torch.zeros(1, int(others.sum()), n_ctx, dtype=hidden.dtype, device=visual.device)
        assign.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
        count = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)  # (1, c, 1)
        merged = torch.bmm(assign.transpose(1, 2), hidden[:, others, :]) / count  # (1, c, D)
        centres = rest[target]  # (c,) absolute
        values[b, centres] = (hidden[:, target, :] + merged)[0]
        keep[b, centres] = True
    return keep, values
