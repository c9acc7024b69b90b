"""FastV (Chen et al., ECCV 2024): "An Image is Worth 1/2 Tokens After Layer 2".

Official code: github.com/pkunlp-icler/FastV @ d1659729b5bf1be225e99ee15783deeea80f63b1,
``src/transformers/src/transformers/models/llama/modeling_llama.py`` (LlamaModel.forward, FastV
branches) and ``src/FastV/llava-hf/transformers/.../modeling_llama.py`` (``fastv_forward``).

Rule: at decoder layer K (0-based index; default K=2) FastV takes the attention weights *output by
layer K-1*, averages them over heads (``torch.mean(attn, dim=1)``), takes the LAST token's row,
slices the image tokens and keeps ``attention.topk(R).indices`` (the kept indices are then sorted
back into positional order). Only the last token's row is used, not an average over queries.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .common import CountLike, topk_keep

__all__ = ["fastv_keep_count", "fastv_scores", "fastv_select"]


def fastv_keep_count(n_tokens: int, drop_ratio: float) -> int:
    """Kept image tokens for a drop ratio R: ``round(n_tokens * (1 - drop_ratio))``.

    This is the llava-hf ``fastv_forward`` rule (``topk(round(FASTV_image_token_length *
    (1 - FASTV_r)))``) with Python's ``round`` (half to even, on the float product). The LLaVA
    eval scripts instead pass the count directly (``--fast-v-attention-rank``: 72/144/288/432 for
    R = 75/50/25/12.5 % of 576), which this rule reproduces.
    """
    return round(n_tokens * (1 - drop_ratio))


def fastv_scores(attention: Tensor) -> Tensor:
    """(B, N) FastV relevance: ``attention`` (B, H, N) averaged over heads (``mean(dim=1)``)."""
    return attention.mean(dim=1)  # (B, N)


def fastv_select(attention: Tensor, counts: CountLike, valid: Optional[Tensor] = None) -> Tensor:
    """FastV keep mask.

    Args:
        attention: (B, H, N) softmax attention of the last prompt token to each visual token at
            layer K-1 (the scoring layer), as produced by the full-sequence softmax.
        counts: int or (B,) long number of tokens to keep per row (see :func:`fastv_keep_count`).
        valid: (B, N) bool or None; padding is never selected.

    Returns:
        (B, N) bool keep mask: the top-``counts`` tokens by head-mean attention (``torch.topk`` on
        the row's valid slice, as the official code does on its image slice).
    """
    return topk_keep(fastv_scores(attention), counts, valid)  # (B, N)
