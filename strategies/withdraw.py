"""VTW's stages (docs/methods.md, "VTW"): every visual token withdrawn before decoder layer k.

Lin et al., Boosting Multimodal Large Language Models with Visual Tokens Withdrawal for Rapid Inference, AAAI 2025
(arXiv 2405.05803); official code github.com/lzhxmu/VTW @ a3d8cfc3c3f8c957b02b504f85e140d633c30453,
``llava/model/language_model/VTW.py`` (``VTWLlamaModel.forward``): before the layer whose ``layer_idx == k`` the
image tokens are cut out of the hidden states and position ids (``pe_type = "keep"``: the text keeps its
positions); the layers before k keep them, and decoding goes on with the text only from layer k on.

``placement.withdraw(k)`` is the in-LLM drop before layer k that accepts the budget 0; ``budget.withdraw`` keeps
no visual token of a row its budget does not cover. ``experiments.vtw_calibration`` picks k as the official
``--findk`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from vtprune.framework.budget import resolve_budget
from vtprune.framework.errors import BudgetError
from vtprune.framework.signals import PLACEMENT_SIGNALS
from vtprune.framework.stages import Allocation, BudgetAllocator, Drop, LayerPlacement

__all__ = ["Withdraw", "WithdrawBudget", "VTW_STAGES", "VTW_LLAVA15_K"]

#: VTW's withdrawal layer for LLaVA-1.5-7B: the official README's "Evaluation with Visual Tokens Withdrawal" command
#: (``--use_vtw --k=15``) and ``temp_cache.k = 15`` in ``VTW.py`` (the value ``--findk`` returns there).
VTW_LLAVA15_K = 15


@dataclass(frozen=True, eq=False)
class Withdraw(LayerPlacement):
    """One drop inside the language model before decoder layer ``k`` that may keep no visual token (VTW).

    Layers < k see every token; from layer k on, the kept visual tokens (none under the budget 0) and the text go on,
    positions as ``framework.prune(positions=...)`` says (``keep`` = VTW's ``pe_type = "keep"``). ``k`` may equal the
    number of decoder layers: no layer runs after the drop, so nothing is withdrawn (the unpruned model).
    """

    name: ClassVar[str] = "withdraw"
    description: ClassVar[str] = "VTW: withdraw the visual tokens before decoder layer k (budget 0 = all of them)"
    provides: ClassVar[frozenset[str]] = PLACEMENT_SIGNALS["layer"]
    accepts_zero_budget: ClassVar[bool] = True
    drops_after_last_layer: ClassVar[bool] = True
    k: int = VTW_LLAVA15_K

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1 (the layer before which the visual tokens are withdrawn), got {self.k}")

    def drops(self, budget: int | float) -> tuple[Drop, ...]:
        return (Drop("layer", self.k, budget),)


@dataclass(frozen=True, eq=False)
class WithdrawBudget(BudgetAllocator):
    """VTW's count: no visual token (budget 0), or every one of a row the budget covers (keep-all).

    VTW has no token budget: its knob is the layer (``placement.withdraw(k)``). A positive budget short of a row's
    tokens is a `BudgetError` (not silently 0), so a grid cannot report VTW under a count it did not keep.
    """

    name: ClassVar[str] = "withdraw"
    description: ClassVar[str] = "VTW: keep no visual token (budget 0) or all of them (a covering budget)"
    keeps_tokens: ClassVar[bool] = False
    plans_from_totals: ClassVar[bool] = True
    budget_settings: ClassVar[tuple[int | float, ...]] = (0,)

    def resolve(self, budget: int | float, valid_counts: Tensor) -> Tensor:
        totals = resolve_budget(budget, valid_counts, rounding=self.rounding)  # (B,)
        if budget != 0 and bool((totals < valid_counts).any()):
            raise BudgetError(
                f"budget.withdraw (VTW) keeps no visual token or all of them: got budget {budget!r} for rows of "
                f"{valid_counts.tolist()} tokens; pass 0 (withdraw every visual token) or a budget covering every "
                "token (1.0: the unpruned model); VTW's knob is the layer, placement.withdraw(k=...)"
            )
        return totals

    def allocate(self, totals: Tensor, valid: Tensor, scores: Optional[Tensor]) -> Allocation:
        return Allocation(total=totals, critical=torch.zeros_like(totals))


#: Registration order.
VTW_STAGES = (Withdraw, WithdrawBudget)
