"""DART (Wen et al., 2025): "Stop Looking for Important Tokens ... Duplication Matters More".

Official code: github.com/ZichenWen1/DART; read from the fork snapshot
github.com/xqy1111111/DART at upstream author commit 5a19452fc173017191c247848673e0bde755695a
(last commit by Zichen Wen; the fork's later commits only add classification scripts),
``llava/model/language_model/modeling_llama_self.py`` (``DART.forward``,
``DART.get_retained_image_token``; decoder layers return ``(x_states, q, k, v)`` as a debug tail)
and ``llava/eval/model_vqa_loader.py`` (defaults: ``K=2``, ``image_token_start_index=35``,
``image_token_length=576``, ``max_num_trunction=128``, ``reduction_ratio=0.778``,
``pivot_image_token=4``, ``pivot_text_token=4``).

Rules reproduced (LLaVA-1.5 branch, ``config.text_length is None``):
* Pruning happens before 0-based decoder layer K (default 2) using layer K-1's outputs:
  ``states = model.norm(layer_output)`` (FINAL RMSNorm applied) for similarities and that layer's
  post-RoPE key states ``(B, H, L, d) -> (B, L, H*d)`` (heads flattened) for pivot scores.
* pivot score = L1 norm of the flattened keys. Image pivots: ``topk(pivot_image_token)`` over
  the image tokens; text pivots: ``topk(pivot_text_token)`` over ALL tokens after the image.
* ``TOKEN_TOPK = math.ceil(X // (pivot_image + pivot_text))`` with
  ``X = max_num_trunction`` when given, else ``N * (1 - reduction_ratio)``.
* pivots are processed in Python ``set`` iteration order of their ABSOLUTE sequence positions
  (image at ``start + i``, text at ``start + N + t``); the candidate list is
  ``list(set(image range) - image pivots)`` (Python set order). For each pivot, the
  ``TOKEN_TOPK`` candidates with the largest ``-F.cosine_similarity(pivot, candidates)`` (least
  similar) are kept and removed from the candidates. The order and positions matter only for
  Python-set order and topk ties; this module reproduces both by using the same Python
  operations on the same integers (hence the ``image_token_start_index`` argument).
* kept = image pivots + all picks: ``pivot_image + (pivot_image + pivot_text) * TOKEN_TOPK``
  tokens (132 with the defaults), not the nominal budget.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import CountLike, mask_from_positions, per_row_counts, row_positions, valid_or_all

__all__ = ["dart_token_topk", "dart_select"]


def dart_token_topk(
    n_tokens: int,
    max_num_trunction: Optional[int] = 128,
    reduction_ratio: float = 0.778,
    pivot_image_token: int = 4,
    pivot_text_token: int = 4,
) -> int:
    """Official per-pivot count ``math.ceil(X // (pivot_image + pivot_text))``.

    ``X = max_num_trunction`` if not None else ``n_tokens * (1 - reduction_ratio)`` (a float;
    ``//`` floors it and ``ceil`` only converts it to int).
    """
    budget = max_num_trunction if max_num_trunction is not None else (n_tokens * (1 - reduction_ratio))
    return math.ceil(budget // (pivot_image_token + pivot_text_token))


def _dart_row(
    image_states: Tensor,
    image_keys: Tensor,
    text_states: Tensor,
    text_keys: Tensor,
    token_topk: int,
    pivot_image_token: int,
    pivot_text_token: int,
    start: int,
) -> list[int]:
    """Kept local image indices for one row (official ``get_retained_image_token`` logic)."""
    n = image_states.shape[0]
    image_l1 = torch.norm(image_keys, p=1, dim=-1)  # (n,)
    text_l1 = torch.norm(text_keys, p=1, dim=-1)  # (t,)
    image_indices = (image_l1.topk(pivot_image_token).indices + start).tolist()
    query_indices = (text_l1.topk(pivot_text_token).indices + start + n).tolist()
    states = torch.cat([image_states, text_states], dim=0)  # (n + t, D), absolute index - start
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(start, start + n)) - set(image_indices)
    valid_list = list(valid_indices)
    for item in list(indices_set):
        candidates = states[[i - start for i in valid_list], :]  # (V, D)
        cos_sim = -F.cosine_similarity(states[item - start, :], candidates, dim=-1)  # (V,)
        picks = [valid_list[i] for i in cos_sim.topk(token_topk).indices]
        indices_set.update(picks)
        valid_indices.difference_update(picks)
        valid_list = list(valid_indices)
    indices_set.difference_update(query_indices)
    return [i - start for i in indices_set]


def dart_select(
    visual: Tensor,
    visual_keys: Tensor,
    prompt: Tensor,
    prompt_keys: Tensor,
    valid: Optional[Tensor] = None,
    prompt_valid: Optional[Tensor] = None,
    budget: Optional[CountLike] = 128,
    reduction_ratio: float = 0.778,
    pivot_image_token: int = 4,
    pivot_text_token: int = 4,
    image_token_start_index: int = 35,
) -> tuple[Tensor, Tensor]:
    """DART keep mask.

    Args:
        visual: (B, N, D) image hidden states after layer K-1 WITH the final norm applied.
        visual_keys: (B, N, Hk, dk) layer K-1 post-RoPE keys of the image tokens.
        prompt: (B, T, D) the same normed states of the text tokens AFTER the image.
        prompt_keys: (B, T, Hk, dk) their keys.
        valid: (B, N) bool or None; prompt_valid: (B, T) bool or None.
        budget: ``max_num_trunction`` (int or (B,) long); None uses ``reduction_ratio``.
        pivot_image_token, pivot_text_token: pivots per modality (official 4 + 4).
        image_token_start_index: absolute position of the first image token (official 35);
            only affects Python set iteration order, as in the official code.

    Returns:
        keep: (B, N) bool (``pivot_image + (pivot_image + pivot_text) * TOKEN_TOPK`` per row);
        pivots: (B, N) bool, the image pivots (critical subset).
    """
    batch, tokens, _ = visual.shape
    valid = valid_or_all(valid, batch, tokens, visual.device)
    prompt_valid = valid_or_all(prompt_valid, batch, prompt.shape[1], prompt.device)
    budgets = per_row_counts(budget, batch) if budget is not None else [None] * batch
    image_keys_flat = visual_keys.reshape(batch, tokens, -1)  # (B, N, Hk*dk)
    text_keys_flat = prompt_keys.reshape(batch, prompt.shape[1], -1)  # (B, T, Hk*dk)
    kept, pivots = [], []
    for b, pos in enumerate(row_positions(valid)):
        n = int(pos.numel())
        text_pos = torch.nonzero(prompt_valid[b], as_tuple=False).flatten()
        topk = dart_token_topk(n, budgets[b], reduction_ratio, pivot_image_token, pivot_text_token)
        local = _dart_row(
            visual[b, pos],
            image_keys_flat[b, pos],
            prompt[b, text_pos],
            text_keys_flat[b, text_pos],
            topk,
            pivot_image_token,
            pivot_text_token,
            image_token_start_index,
        )
        kept.append(pos[torch.tensor(local, dtype=torch.long, device=pos.device)])
        piv = torch.norm(image_keys_flat[b, pos], p=1, dim=-1).topk(pivot_image_token).indices
        pivots.append(pos[piv])
    return (
        mask_from_positions(kept, batch, tokens, visual.device),
        mask_from_positions(pivots, batch, tokens, visual.device),
    )
