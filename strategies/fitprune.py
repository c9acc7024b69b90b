"""FitPrune as stages: the ranking (``relevance.fitprune``) and the fitted per-layer recipe as a placement
(``placement.fitprune``). Thin wrappers over `functional.fitprune`; the recipe search is
`vtprune.experiments.fitprune_fit`. docs/methods.md ("FitPrune") states the rules and the deviations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from vtprune.framework.signals import PLACEMENT_SIGNALS, Signals
from vtprune.framework.stages import Drop, LayerPlacement, RelevanceScorer

from .functional.fitprune import fitprune_scores

__all__ = ["FitPruneRelevance", "FitPruneRecipe", "OFFICIAL_DELETIONS_60", "OFFICIAL_RECIPE_TOKENS", "FITPRUNE_STAGES"]

#: The image size the official recipe was fitted for: LLaVA-1.5's CLIP ViT-L/14 at 336 px gives (336 / 14)^2 patches.
OFFICIAL_RECIPE_TOKENS: int = (336 // 14) ** 2
#: The official recipe for LLaVA-1.5-7B at a 60% FLOPs reduction (``delete_scheme`` for ``reduction_ratio == 60`` in
#: modeling_llama.py @ d28e418c, the reduction its scripts/v1_5/eval/textvqa.sh runs): tokens deleted after each of
#: the 32 decoder layers, out of `OFFICIAL_RECIPE_TOKENS`.
OFFICIAL_DELETIONS_60: tuple[int, ...] = (
    14, 33, 89, 36, 36, 20, 55, 21, 18, 4, 7, 5, 2, 5, 7, 4,
    26, 5, 11, 24, 4, 18, 2, 1, 0, 0, 1, 0, 1, 0, 0, 0,
)


@dataclass(frozen=True, eq=False)
class FitPruneRelevance(RelevanceScorer):
    """FitPrune's ranking: ``cross * self`` from the head-max attention of the scoring layer (text rows after the
    image, summed; visual rows divided by n, summed), low = deleted first (`functional.fitprune.fitprune_scores`)."""

    name: ClassVar[str] = "fitprune"
    description: ClassVar[str] = "FitPrune: head-max attention received from the text rows x from the visual rows / n"
    requires: ClassVar[frozenset[str]] = frozenset({"prompt_attention", "visual_attention"})
    optional: ClassVar[frozenset[str]] = frozenset({"prompt_mask"})

    def score(self, signals: Signals) -> Tensor:
        return fitprune_scores(
            signals.prompt_attention, signals.visual_attention, signals.visual_mask, signals.prompt_mask
        )  # (B, N)


@dataclass(frozen=True, eq=False)
class FitPruneRecipe(LayerPlacement):
    """A FitPrune recipe as in-LLM drops: ``deletions[l]`` tokens go after decoder layer l (before layer l + 1,
    scored with layer l's own attention), counted for an image of ``tokens`` tokens.

    The requested budget is what the first drop (after layer 0) keeps, in place of ``tokens - deletions[0]`` (the
    budget that reproduces the recipe; a covering budget keeps layer 0's tokens); each later layer l with deletions
    keeps ``(P_l - deletions[l]) / P_l`` of the tokens present, ``P_l = tokens - sum(deletions[:l])``, so an image of
    ``tokens`` tokens loses exactly the recipe's counts (rounded half up) and other sizes the same fractions.
    Deletions after the last layer change nothing (its keys are cached before them) and are left out.
    Default: the official LLaVA-1.5-7B recipe at a 60% FLOPs reduction (`OFFICIAL_DELETIONS_60`).
    """

    name: ClassVar[str] = "fitprune"
    description: ClassVar[str] = (
        "FitPrune recipe: the budget after layer 0, then deletions[l] of `tokens` after each layer l, as fractions"
    )
    provides: ClassVar[frozenset[str]] = PLACEMENT_SIGNALS["schedule"]
    deletions: tuple[int, ...] = OFFICIAL_DELETIONS_60
    tokens: int = OFFICIAL_RECIPE_TOKENS

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {self.tokens}")
        if any(int(d) < 0 for d in self.deletions):
            raise ValueError(f"deletions must be >= 0, got {list(self.deletions)}")
        if sum(self.deletions[:-1]) >= self.tokens:
            raise ValueError(
                f"deletions {list(self.deletions)} remove {sum(self.deletions[:-1])} of tokens={self.tokens}: "
                "at least one token must stay"
            )

    def ratios(self) -> tuple[tuple[int, float], ...]:
        """``(layer k, kept fraction)`` of every drop after the first: before layer k = l + 1 for each layer l >= 1
        with deletions (the last layer's left out)."""
        present = self.tokens - (self.deletions[0] if self.deletions else 0)
        out = []
        for layer in range(1, len(self.deletions) - 1):
            deleted = int(self.deletions[layer])
            if deleted:
                out.append((layer + 1, (present - deleted) / present))
                present -= deleted
        return tuple(out)

    def drops(self, budget: int | float) -> tuple[Drop, ...]:
        return (Drop("layer", 1, budget), *(Drop("layer", k, ratio) for k, ratio in self.ratios()))


FITPRUNE_STAGES = (FitPruneRelevance, FitPruneRecipe)
