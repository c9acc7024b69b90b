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

from .common import CountLike, mask_from_positions, per_row_counts, valid_or_all, valid_rows

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
    texts = valid_rows(clip_text_mask, batch, clip_text.shape[1], clip_text.device)
    out = torch.zeros(batch, tokens, dtype=torch.result_type(clip_visual, clip_text), device=clip_visual.device)
    for b, pos in enumerate(valid_rows(valid, batch, tokens, clip_visual.device)):
        if pos is not None and pos.numel() == 0:
            continue
        image = (clip_visual[b] if pos is None else clip_visual[b, pos]).unsqueeze(0)  # (1, n, C)
        text = clip_text[b] if texts[b] is None else clip_text[b, texts[b]]  # (m, C)
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        rel = torch.matmul(image, text.t())  # (1, n, m)
        rel = (-rel).mean(dim=-1)  # (1, n)
        rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())  # (1, n)
        if pos is None:
            out[b] = rel[0].to(out.dtype)
        else:
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
    if torch.result_type(relevance, similarity) != similarity.dtype:  # e.g. float64 relevance: a float64 kernel
        return relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)  # (B, N, N)
    # the official ``r_i * S * r_j`` (left product first), written into the fresh similarity buffer: the same
    # two products in the same order, without two more (B, N, N) allocations
    return similarity.mul_(relevance.unsqueeze(2)).mul_(relevance.unsqueeze(1))  # (B, N, N)


def _greedy_map(kernel: Tensor, steps: int) -> Tensor:
    """(steps,) picks of the official fast greedy MAP on a (1, n, n) kernel (batch of one).

    Same arithmetic as the official loop, with the batch of one made explicit: the official
    ``einsum('tb,tbn->bn', c[:i, :, j], c[:i])`` is the batched product ``bmm`` of the same two
    operands in the same layout (what einsum dispatches to), so every value is bit-identical.
    """
    return _greedy_map_residuals(kernel, steps)[0]


def _greedy_map_residuals(kernel: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """:func:`_greedy_map`'s (steps,) picks and the (steps,) residual ``d2`` each pick had when it was chosen."""
    n = kernel.shape[1]
    rows = kernel[0]  # (n, n)
    cis = torch.zeros((steps, n), device=kernel.device)  # (T, n) fp32 like official
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # (1, n)
    picks, residuals = [], []
    for i in range(steps):
        d2, j = di2s.max(dim=-1)  # (1,), (1,): the first maximum, as argmax
        picks.append(j)
        residuals.append(d2)
        _map_update(rows, cis, di2s, i, j, d2)
    if not picks:
        empty = torch.empty(0, device=kernel.device)
        return empty.long(), empty
    return torch.cat(picks), torch.cat(residuals)


def _map_update(rows: Tensor, cis: Tensor, di2s: Tensor, used: int, j: Tensor, d2: Optional[Tensor] = None) -> None:
    """One fast-greedy-MAP update after picking ``j`` (1,) whose residual is ``d2`` (1,) (read from
    ``di2s`` when None): writes ``cis[used]``, lowers ``di2s`` (1, n) in place and sets
    ``di2s[j] = -inf`` (official order of operations)."""
    row = rows.index_select(0, j)  # (1, n)
    if used:
        head = cis[:used]  # (used, n)
        column = head.index_select(1, j)  # (used, 1)
        row = row - torch.bmm(column.view(1, 1, used), head.unsqueeze(0)).view(1, -1)  # (1, n)
    d2 = di2s.index_select(1, j) if d2 is None else d2.view(1, 1)  # (1, 1)
    eis = row / torch.sqrt(d2)  # (1, n)
    cis.narrow(0, used, 1).copy_(eis)
    di2s -= torch.square(eis)
    di2s.index_fill_(1, j, -float("inf"))


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
    for b, (pos, k) in enumerate(zip(valid_rows(valid, batch, tokens, visual.device), per_row_counts(counts, batch))):
        features, weights = _row(visual, b, pos), _row(relevance, b, pos)  # (1, n, D), (1, n)
        picks = _greedy_map(cdpruner_kernel(features, weights, theta), max(0, min(k, features.shape[1])))  # (k,)
        kept.append(picks if pos is None else pos[picks])
    return mask_from_positions(kept, batch, tokens, visual.device)


def _row(tensor: Tensor, b: int, pos: Optional[Tensor]) -> Tensor:
    """Row ``b`` of ``tensor`` (B, N, ...) as a batch of one: a view, or the gathered valid positions."""
    return tensor[b : b + 1] if pos is None else tensor[b : b + 1, pos]


def _conditional_greedy_map(kernel: Tensor, forced: list[int], steps: int) -> Tensor:
    """(steps,) long picks of the fast greedy MAP on a (1, n, n) kernel conditioned on the ``forced``
    picks (processed first).

    With no forced pick this is :func:`_greedy_map`'s arithmetic (same picks), except that picked
    tokens are excluded from the argmax explicitly (the official code relies on ``d2[j] = -inf``,
    which NaN/inf arithmetic past the kernel's rank can undo, re-picking a token; when every free
    ``d2`` is -inf we take the first free token, chosen with tensor ops so a step never waits for
    the device), so exactly ``steps`` distinct tokens come out. A forced pick whose residual
    ``d2 <= 0`` (already in the span of earlier picks) is marked without an update.
    """
    if not forced:
        # The official loop, without the per-step exclusion: while every pick's residual is finite and > 0, no
        # NaN ever reaches ``d2`` (a NaN would be the next maximum) and picked tokens keep d2 = -inf, so the
        # exclusion below would change nothing and the picks are the same; otherwise run the guarded loop.
        picks, residuals = _greedy_map_residuals(kernel, steps)
        if bool(((residuals > 0) & (residuals < float("inf"))).all()):
            return picks
    n = kernel.shape[1]
    device = kernel.device
    rows = kernel[0]  # (n, n)
    cis = torch.zeros((len(forced) + steps, n), device=device)  # (T, n)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # (1, n)
    picked = torch.zeros(1, n, dtype=torch.bool, device=device)  # (1, n)
    free = torch.ones(1, n, dtype=torch.int8, device=device)  # (1, n) 1 = not picked yet
    used = 0
    for index in forced:
        j = torch.tensor([index], device=device)  # (1,)
        if bool(di2s[0, index] > 0):
            _map_update(rows, cis, di2s, used, j)
            used += 1
        else:
            di2s[0, index] = -float("inf")
        picked[0, index] = True
        free[0, index] = 0
    out = []
    for _ in range(steps):
        best, j = di2s.masked_fill(picked, -float("inf")).max(dim=-1)  # (1,), (1,): first maximum
        # every free d2 is -inf (degenerate kernel) exactly when the maximum is -inf: first free token
        j = torch.where(best == -float("inf"), free.argmax(dim=-1), j)  # (1,)
        out.append(j)
        _map_update(rows, cis, di2s, used, j)
        used += 1
        picked.index_fill_(1, j, True)
        free.index_fill_(1, j, 0)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=device)


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
    if relevance is None:
        relevance = torch.ones(batch, tokens, device=visual.device)
    kept = []
    for b, (pos, k) in enumerate(zip(valid_rows(valid, batch, tokens, visual.device), per_row_counts(counts, batch))):
        taken = selected[b] if pos is None else selected[b, pos]  # (n,)
        forced = torch.nonzero(taken, as_tuple=False).flatten().tolist()
        k = max(0, min(k, taken.shape[0] - len(forced)))
        if k == 0:
            kept.append(taken.new_zeros(0, dtype=torch.long))
            continue
        kernel = cdpruner_kernel(_row(visual, b, pos), _row(relevance, b, pos), theta)  # (1, n, n)
        picks = _conditional_greedy_map(kernel, forced, k)  # (k,)
        kept.append(picks if pos is None else pos[picks])
    return mask_from_positions(kept, batch, tokens, visual.device)
