"""Prompt-aware relevance: cosine similarity of visual tokens to the prompt (ZSPAPrune's scorer)."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

__all__ = ["PromptPool", "prompt_cosine_scores"]

PromptPool = Literal["mean", "max", "token_max"]


def prompt_cosine_scores(
    visual: Tensor, prompt: Tensor, prompt_valid: Optional[Tensor] = None, pool: PromptPool = "mean"
) -> Tensor:
    """(B, N) float32 relevance of each visual token to the prompt.

    Args:
        visual: (B, N, D) visual tokens.
        prompt: (B, T, D) prompt tokens in the same space.
        prompt_valid: (B, T) bool, True = real prompt token (None = all real).
        pool: ``mean``: cosine to the mean of the real prompt tokens (the paper's rule);
            ``max``: cosine to the element-wise max of the real prompt tokens;
            ``token_max``: cosine to every real prompt token, then the max over tokens.
    A row with no real prompt token scores 0 everywhere. Computed in float32.

    >>> v = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]); p = torch.tensor([[[1.0, 0.0]]])
    >>> prompt_cosine_scores(v, p).tolist()
    [[1.0, 0.0]]
    """
    visual = visual.float()
    prompt = prompt.float()
    if prompt_valid is None:
        prompt_valid = torch.ones(prompt.shape[:2], dtype=torch.bool, device=prompt.device)
    weights = prompt_valid.float().unsqueeze(-1)  # (B, T, 1)
    unit_visual = torch.nn.functional.normalize(visual, dim=-1)  # (B, N, D)
    if pool == "token_max":
        unit_prompt = torch.nn.functional.normalize(prompt, dim=-1)  # (B, T, D)
        similarity = unit_visual @ unit_prompt.transpose(1, 2)  # (B, N, T)
        similarity = similarity.masked_fill(~prompt_valid.unsqueeze(1), float("-inf"))
        scores = similarity.max(dim=-1).values  # (B, N)
        return torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
    if pool == "mean":
        pooled = (prompt * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # (B, D)
    elif pool == "max":
        pooled = prompt.masked_fill(~prompt_valid.unsqueeze(-1), float("-inf")).max(dim=1).values  # (B, D)
        pooled = torch.where(torch.isfinite(pooled), pooled, torch.zeros_like(pooled))
    else:
        raise ValueError(f"pool must be 'mean', 'max' or 'token_max', got {pool!r}")
    unit_pooled = torch.nn.functional.normalize(pooled, dim=-1)  # (B, D)
    return torch.einsum("bnd,bd->bn", unit_visual, unit_pooled)  # (B, N)
