"""CDPruner without a CLIP model: relevance from the LLM-space prompt embedding, and OpenVINO GenAI's
kernel / split / greedy as a diversity stage (maths in ``functional/cdpruner_ov.py``).

* ``relevance.llm_text(minmax=True)``: each visual token's cosine (epsilon-normalised) to the mean of
  the row's prompt-token embeddings (``Signals.prompt``), not negated; ``minmax`` applies OpenVINO's
  ``(r - min) / (max - min + eps)`` over the row's real tokens. With ``minmax=False`` the raw cosine is
  left for ``diversity.dpp_ov``, which normalises per part as OpenVINO does.
* ``diversity.dpp_ov(relevance_weight=0.5, split_threshold=1)``: OpenVINO's kernel
  ``(1 - w) S + w r_i S r_j`` and fast greedy MAP; ``split_threshold`` > 0 cuts a row of more tokens
  than that into two halves run separately (OpenVINO's default, ``split_threshold=1``); 0 = the full
  kernel (``CDPRUNER_SPLIT_THRESHOLD=0``). It chooses among the row's real tokens not yet selected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from vtprune.framework.signals import Signals
from vtprune.framework.stages import DiversitySupplementer, RelevanceScorer, Supplement

from .functional.cdpruner_ov import (
    OV_RELEVANCE_WEIGHT,
    OV_SPLIT_THRESHOLD,
    ov_cdpruner_row,
    ov_minmax,
    ov_prompt_relevance,
)
from .functional.common import mask_from_positions, per_row_counts, valid_or_all

__all__ = ["LLMTextRelevance", "OpenVINODPPDiversity", "OV_STAGES"]


@dataclass(frozen=True, eq=False)
class LLMTextRelevance(RelevanceScorer):
    """CDPruner relevance in the LLM embedding space (OpenVINO GenAI's rule): cosine of each visual
    token to the mean prompt embedding, min-max normalised per row when ``minmax``."""

    name: ClassVar[str] = "llm_text"
    description: ClassVar[str] = "cos(visual, mean prompt embedding) in LLM space (OpenVINO CDPruner), min-max per row"
    requires: ClassVar[frozenset[str]] = frozenset({"prompt"})
    minmax: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.minmax, bool):
            raise TypeError(f"minmax must be True or False, got {self.minmax!r}")

    def score(self, signals: Signals) -> Tensor:
        visual = signals.visual  # (B, N, D)
        batch, tokens, _ = visual.shape
        valid = valid_or_all(signals.visual_mask, batch, tokens, visual.device)  # (B, N)
        prompt = signals.prompt  # (B, T, D)
        prompt_valid = valid_or_all(signals.prompt_mask, batch, prompt.shape[1], visual.device)  # (B, T)
        out = torch.zeros(batch, tokens, dtype=torch.float32, device=visual.device)  # (B, N)
        for b in range(batch):
            pos = torch.nonzero(valid[b]).flatten()  # (n,)
            if pos.numel() == 0:
                continue
            rel = ov_prompt_relevance(visual[b, pos], prompt[b, prompt_valid[b]])  # (n,)
            out[b, pos] = ov_minmax(rel) if self.minmax else rel
        return out


@dataclass(frozen=True, eq=False)
class OpenVINODPPDiversity(DiversitySupplementer):
    """OpenVINO GenAI's CDPruner selection: min-max of the scores per part, kernel
    ``(1 - w) S + w r_i S r_j``, fast greedy MAP; optional split into two halves."""

    name: ClassVar[str] = "dpp_ov"
    description: ClassVar[str] = (
        "OpenVINO GenAI CDPruner: kernel (1-w)S + w*r_i*S*r_j, greedy MAP, split into halves above split_threshold"
    )
    relevance_weight: float = OV_RELEVANCE_WEIGHT
    split_threshold: int = OV_SPLIT_THRESHOLD

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.relevance_weight) <= 1.0:
            raise ValueError(f"relevance_weight must be in [0, 1], got {self.relevance_weight}")
        if isinstance(self.split_threshold, bool) or not isinstance(self.split_threshold, int) or self.split_threshold < 0:
            raise ValueError(f"split_threshold must be an int >= 0 (0 = no split, 1 = OpenVINO's default), got {self.split_threshold!r}")

    def supplement(self, signals: Signals, selected: Tensor, counts: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Supplement:
        visual = signals.visual  # (B, N, D)
        batch, tokens, _ = visual.shape
        valid = valid_or_all(valid, batch, tokens, visual.device)  # (B, N)
        if scores is None:
            scores = torch.ones(batch, tokens, device=visual.device)  # (B, N): no relevance -> plain similarity
        kept = []
        for b, k in enumerate(per_row_counts(counts, batch)):
            pos = torch.nonzero(valid[b] & ~selected[b]).flatten()  # (n,)
            k = max(0, min(k, pos.numel()))
            if k == 0:
                kept.append(pos[:0])
                continue
            picks = ov_cdpruner_row(
                visual[b, pos], scores[b, pos], k, float(self.relevance_weight), self.split_threshold
            )  # (k,)
            kept.append(pos[picks.to(pos.device)])
        return Supplement(mask_from_positions(kept, batch, tokens, visual.device))


OV_STAGES = (LLMTextRelevance, OpenVINODPPDiversity)
