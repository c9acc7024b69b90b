"""CDPruner (Zhang et al., 2025): instruction-conditioned DPP over visual tokens.

Official code: github.com/Theia-4869/CDPruner @ 9541616c40fcd5625de1cdb8ea6c33c129eb7864,
``llava/model/llava_arch.py`` (``LlavaMetaForCausalLM.encode_images``) and
``llava/model/multimodal_encoder/clip_encoder.py`` (``CLIPVisionTower.forward``: image_embeds =
``visual_projection(post_layernorm(penultimate patch features).float())``; text_embeds = CLIP
``text_embeds`` of the instruction, one per 77-token segment).

Rules reproduced:
* similarity: post-projector features ``F / F.norm(dim=-1, keepdim=True)`` (in their own dtype),
  then ``.float()``, then ``S = Fn @ Fn^T``.
* relevance: ``r = (-(In @ Tn^T)).mean(-1)`` (note the NEGATION) with L2-normalised CLIP image
  and text embeddings; ``r = (r - r.min() + 1e-6) / (r.max() - r.min())``.
  Deviation: official min/max are over the whole batch tensor; here they are per row over the
  row's valid tokens (identical at batch size 1, the official evaluation setting).
* kernel: ``L = r[:, None] * S * r[None, :]`` (left product first). Optional theta variant from
  the official comment: ``r = exp(alpha * r)``, ``alpha = theta / (2 * (1 - theta))``; the
  official default is OFF (``theta=None``).
* greedy fast MAP (Chen et al. 2018) for exactly T steps, no epsilon stop: ``j = argmax(d2)``;
  ``e = (L[j] - einsum('tb,tbn->bn', c[:i, j], c[:i])) / sqrt(d2[j])``; ``c[i] = e``;
  ``d2 -= e**2``; ``d2[j] = -inf``. ``argmax`` takes the first maximum (NaN counts as maximal).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .common import CountLike, mask_from_positions, per_row_counts, row_positions, valid_or_all

__all__ = ["cdpruner_relevance", "cdpruner_kernel", "cdpruner_select", "cdpruner_supplement"]


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
