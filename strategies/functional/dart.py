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

from .common import CountLike, mask_from_positions, per_row_counts, row_positions, unit_rows, valid_or_all

__all__ = ["dart_token_topk", "dart_select", "dart_supplement"]


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


def _dart_picks(
    states: Tensor,
    pivots: list[int],
    candidates: list[int],
    per_pivot: list[int],
    official_topk: bool,
) -> list[int]:
    """For each pivot in order, take ``per_pivot[i]`` least cosine-similar candidates (greedy).

    ``states`` (n + t, D) holds image then text states; indices are local to it. With
    ``official_topk`` the official ``(-cos).topk`` is used on the candidates in the given order;
    otherwise a stable descending sort (ties to the earlier candidate).
    """
    picks: list[int] = []
    remaining = list(candidates)
    for item, take in zip(pivots, per_pivot):
        take = min(take, len(remaining))
        if take <= 0:
            continue
        cand = states[remaining, :]  # (V, D)
        cos_sim = -F.cosine_similarity(states[item, :], cand, dim=-1)  # (V,)
        if official_topk:
            chosen = cos_sim.topk(take).indices.tolist()
        else:
            chosen = torch.sort(cos_sim.nan_to_num(nan=float("-inf")), descending=True, stable=True).indices[:take].tolist()
        new = [remaining[i] for i in chosen]
        picks.extend(new)
        drop = set(new)
        remaining = [c for c in remaining if c not in drop]
    return picks


def dart_supplement(
    visual: Tensor,
    prompt: Tensor,
    prompt_keys: Tensor,
    selected: Tensor,
    counts: CountLike,
    valid: Optional[Tensor] = None,
    prompt_valid: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    pivot_text_token: int = 4,
    faithful: bool = False,
    image_token_start_index: int = 35,
) -> Tensor:
    """DART's duplicate-aware picks around pivots, given the image pivots ``selected``.

    Pivots: the ``selected`` image tokens plus the top ``pivot_text_token`` prompt tokens by L1
    norm of ``prompt_keys`` (flattened heads). For each pivot the least cosine-similar remaining
    image tokens (``visual``, hidden states) are taken and leave the candidate set.

    Default (``faithful=False``): exactly ``counts[b]`` picks, split over the P pivots as evenly as
    possible (the first ``counts % P`` pivots take one more); pivots in position order (image, then
    text), candidates in position order, ties to the earlier candidate. A row with no pivot
    (no image pivot, no prompt) uses the valid token least similar to the row mean as its pivot.

    ``faithful=True``: the official rule: ``TOKEN_TOPK = ceil(X // P)`` with X = ``counts[b]`` +
    the number of image pivots (the requested budget, ``max_num_trunction``), ``TOKEN_TOPK`` picks
    per pivot, pivot and candidate order from the same Python ``set`` operations on absolute
    positions (``image_token_start_index``), image pivots in ``scores`` topk order. Picks may then
    exceed ``counts[b]`` (official kept count = image pivots + P * TOKEN_TOPK).
    """
    batch, tokens, _ = visual.shape
    valid = valid_or_all(valid, batch, tokens, visual.device)
    prompt_valid = valid_or_all(prompt_valid, batch, prompt.shape[1], prompt.device)
    text_keys_flat = prompt_keys.reshape(batch, prompt.shape[1], -1)  # (B, T, Hk*dk)
    kept = []
    for b, (pos, k) in enumerate(zip(row_positions(valid), per_row_counts(counts, batch))):
        n = int(pos.numel())
        taken = selected[b, pos]
        n_piv = int(taken.sum())
        k = max(0, min(k, n - n_piv))
        if k == 0 and not faithful:
            kept.append(pos[:0])
            continue
        text_pos = torch.nonzero(prompt_valid[b], as_tuple=False).flatten()
        t = int(text_pos.numel())
        text_l1 = torch.norm(text_keys_flat[b, text_pos], p=1, dim=-1)  # (t,)
        text_piv = text_l1.topk(min(pivot_text_token, t)).indices.tolist()  # local text indices
        image_states = visual[b] if n == tokens else visual[b, pos]  # (n, D): a view when every token is real
        image_piv = torch.nonzero(taken, as_tuple=False).flatten().tolist()
        if faithful:
            if scores is not None and n_piv:
                order = scores[b, pos].topk(n_piv).indices.tolist()
                if set(order) == set(image_piv):
                    image_piv = order
            start = image_token_start_index
            image_indices = [i + start for i in image_piv]
            query_indices = [i + start + n for i in text_piv]
            pivots_abs = list(set(image_indices + query_indices))
            n_p = len(image_indices) + len(query_indices)
            token_topk = math.ceil((k + n_piv) // n_p) if n_p else 0
            valid_indices = set(range(start, start + n)) - set(image_indices)
            picks = _dart_picks_official(image_states, prompt[b, text_pos], pivots_abs, valid_indices, token_topk, start)
        else:
            states = torch.cat([image_states, prompt[b, text_pos]], dim=0)  # (n + t, D)
            pivots = image_piv + sorted(n + i for i in text_piv)
            candidates = [i for i in range(n) if not bool(taken[i])]
            if not pivots:
                centre = visual[b, pos].float().mean(dim=0, keepdim=True)
                pivots = [int(F.cosine_similarity(visual[b, pos].float(), centre, dim=-1).argmin())]
                if pivots[0] in candidates and k >= 1:
                    candidates.remove(pivots[0])
                    k -= 1
                    picks_seed = [pivots[0]]
                else:
                    picks_seed = []
            else:
                picks_seed = []
            q, r = divmod(k, len(pivots))
            per_pivot = [q + 1 if i < r else q for i in range(len(pivots))]
            picks = picks_seed + _dart_picks(states, pivots, candidates, per_pivot, official_topk=False)
        kept.append(pos[torch.tensor(picks, dtype=torch.long, device=pos.device)])
    return mask_from_positions(kept, batch, tokens, visual.device)


def _dart_picks_official(
    image_states: Tensor, text_states: Tensor, pivots_abs: list[int], valid_indices: set, token_topk: int, start: int
) -> list[int]:
    """The official per-pivot loop on absolute positions (Python set order), local picks out.

    ``image_states`` (n, D) and ``text_states`` (t, D) are the official ``last_layer_state`` rows of the image
    and of the text after it (kept apart: no concatenated copy); candidates are image tokens only. The official
    ``-F.cosine_similarity(pivot, candidates)`` values, computed from unit rows (see the comment below)."""
    valid_list = list(valid_indices)
    n = image_states.shape[0]
    # F.cosine_similarity(pivot, candidates) is (unit_rows(pivot) * unit_rows(candidates)).sum(-1) bit for bit, row
    # by row: the image rows are divided by their norms once for all pivots, and no candidate rows are gathered
    image_units = unit_rows(image_states)  # (n, D)
    picks: list[int] = []
    for item in pivots_abs:
        take = min(token_topk, len(valid_list))
        if take <= 0:
            break
        local = item - start
        pivot = image_units[local] if local < n else unit_rows(text_states[local - n])  # (D,)
        candidates = torch.tensor([i - start for i in valid_list], dtype=torch.long, device=image_states.device)  # (V,)
        cos_sim = -(pivot * image_units).sum(-1)[candidates]  # (V,)
        new = [valid_list[i] for i in cos_sim.topk(take).indices]
        picks.extend(i - start for i in new)
        valid_indices.difference_update(new)
        valid_list = list(valid_indices)
    return picks
