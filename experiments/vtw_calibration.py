"""VTW's choice of the withdrawal layer k on a few calibration samples (the official ``--findk``).

Official code: github.com/lzhxmu/VTW @ a3d8cfc3c3f8c957b02b504f85e140d633c30453. ``VTWLlamaModel.forward``
(``llava/model/language_model/VTW.py``) reruns the prefill once per candidate layer with the image tokens cut before
it and keeps the final-norm hidden state of the last token; ``VTWLlamaForCausalLM.forward`` turns each into logits
and records ``KLDivLoss(reduction="batchmean")(log_softmax(full logits), softmax(withdrawn logits))``, i.e.
KL(withdrawn || full) of the next-token distributions at the last prompt token; ``lmms_eval/__main__.py`` averages
these over the samples and prints the first candidate whose mean is ``<= eta`` (candidates ``range(5, layers)``;
eta 0.003 for llava-v1.5-7b, 0.0005 for llava-v1.5-13b, 0.0001 for llava-v1.6-vicuna-7b, 0.003 otherwise).

Here every withdrawn run is the `vtw` preset (``placement.withdraw(k)``, budget 0) attached to the model with
``framework.prune``, so the calibration measures exactly what the preset runs. Logits are compared in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "OFFICIAL_FIRST_CANDIDATE",
    "OFFICIAL_THRESHOLDS",
    "WithdrawCalibration",
    "official_candidates",
    "withdrawal_kl",
    "calibrate_withdraw_layer",
]

#: The first candidate layer of the official search (``range(5, len(self.layers))`` in ``VTW.py``).
OFFICIAL_FIRST_CANDIDATE = 5
#: The official thresholds (eta) by model (``lmms_eval/__main__.py``; any other model: 0.003).
OFFICIAL_THRESHOLDS: Mapping[str, float] = {
    "llava-v1.5-7b": 0.003,
    "llava-v1.5-13b": 0.0005,
    "llava-v1.6-vicuna-7b": 0.0001,
}


@dataclass(frozen=True)
class WithdrawCalibration:
    """The result of `calibrate_withdraw_layer`.

    Attributes:
        layer: the first candidate whose mean KL is at most the threshold, or None when none is (the official
            script then fails on an empty index).
        mean_kl: candidate layer -> mean KL(withdrawn || full) over the samples, in candidate order.
        threshold: the threshold used.
    """

    layer: Optional[int]
    mean_kl: dict[int, float] = field(default_factory=dict)
    threshold: float = 0.0


def official_candidates(num_layers: int) -> range:
    """The official candidate layers for a language model of ``num_layers`` decoder layers: ``5 .. num_layers - 1``."""
    return range(OFFICIAL_FIRST_CANDIDATE, num_layers)


def withdrawal_kl(full_logits: Tensor, withdrawn_logits: Tensor) -> float:
    """KL(withdrawn || full) of the next-token distributions, averaged over the batch (``KLDivLoss(batchmean)``).

    Args:
        full_logits: (B, V) logits of the unpruned model at the last token.
        withdrawn_logits: (B, V) logits with the visual tokens withdrawn.
    """
    log_full = torch.log_softmax(full_logits.float(), dim=-1)  # (B, V)
    withdrawn = torch.softmax(withdrawn_logits.float(), dim=-1)  # (B, V)
    loss = torch.nn.functional.kl_div(log_full, withdrawn, reduction="batchmean")  # sum p_w (log p_w - log p_full) / B
    return float(loss)


def _last_logits(model: Any, sample: Mapping[str, Any]) -> Tensor:
    """(B, V) the model's logits at the last position of ``sample`` (the last prompt token; left padding keeps it last)."""
    with torch.no_grad():
        return model(**sample).logits[:, -1]


def calibrate_withdraw_layer(
    model: Any,
    samples: Iterable[Mapping[str, Any]],
    candidates: Sequence[int],
    threshold: float,
    *,
    recipe: Any = "vtw",
    registry: Any = None,
    positions: str = "keep",
) -> WithdrawCalibration:
    """Pick VTW's layer k: the first of ``candidates`` whose mean KL(withdrawn || full) over ``samples`` is <= threshold.

    Args:
        model: a supported VLM (one instance; nothing stays attached after the call).
        samples: model inputs (keyword arguments of ``model(...)``), e.g. a processor's output per sample.
        candidates: the layers to try, in search order (`official_candidates` for the official search); each must be
            a valid ``withdraw(k)`` for the model (1 .. decoder layers).
        threshold: eta; `OFFICIAL_THRESHOLDS` holds the official values.
        recipe: the withdrawing pipeline (the `vtw` preset by default; its ``k`` is overridden per candidate).
        registry: the registry for ``framework.prune`` (default: installed plugins).
        positions: ``framework.prune``'s positions (``keep``: VTW's ``pe_type = "keep"``).
    Returns: a `WithdrawCalibration` (the chosen layer, or None, and the mean KL of every candidate).
    """
    from vtprune.framework.prune import prune

    candidates = [int(k) for k in candidates]
    if not candidates:
        raise ValueError("candidates must name at least one layer")
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite KL >= 0, got {threshold}")
    samples = list(samples)
    if not samples:
        raise ValueError("samples must hold at least one calibration sample")
    totals = {k: 0.0 for k in candidates}
    for sample in samples:
        full = _last_logits(model, sample)  # (B, V)
        for k in candidates:
            with prune(model, recipe, budget=0, positions=positions, registry=registry, k=k):
                withdrawn = _last_logits(model, sample)  # (B, V)
            totals[k] += withdrawal_kl(full, withdrawn)
    mean_kl = {k: totals[k] / len(samples) for k in candidates}
    chosen = next((k for k in candidates if mean_kl[k] <= threshold), None)
    return WithdrawCalibration(layer=chosen, mean_kl=mean_kl, threshold=threshold)
