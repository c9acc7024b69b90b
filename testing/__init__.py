"""vtprune.testing: a testing kit for plugin authors (and vtprune's own tests).

- Signals factories (`vtprune.testing.signals`): :func:`make_signals`, :func:`make_video_signals`, :func:`ragged_signals`,
  :func:`clustered_signals`, :func:`signals_for`.
- The selection contract (`vtprune.testing.contracts`): :func:`check_selection` (one batch; the relaxed count rule
  for pipelines whose kept count comes from the data, :func:`adaptive_counts`),
  :func:`check_pipeline` (a sweep over shapes, seeds and budgets), :func:`check_stage` / :func:`check_preset`
  (a registered stage among default stages), :class:`ContractError`.
- :func:`registry_cases` / :func:`check_case`: a ``pytest.mark.parametrize`` list over every registered stage and
  preset, installed plugins included.
- The adapter contract (`vtprune.testing.adapters`): :func:`check_adapter` on a tiny model; tiny LLaVA,
  LLaVA-NeXT and Qwen2-VL factories and their batches (`vtprune.testing.models`): :func:`tiny_llava` /
  :func:`llava_batch`, :func:`tiny_llava_next` / :func:`llava_next_batch`, :func:`tiny_qwen2_vl` /
  :func:`qwen2_vl_batch`.
- Test stages (`vtprune.testing.stages`, registered only in :func:`kit_registry`): :class:`NormOrder`
  (``diversity.norm_order``, a `Selection.order` without merged values, for the adapters' emission path).
- Hypothesis strategies (`vtprune.testing.properties`), imported only where used.

Only torch and vtprune are imported here: pytest, hypothesis and transformers are imported by the functions that
need them.
"""

from __future__ import annotations

from .adapters import AdapterContractError, check_adapter
from .cases import StageCase, check_case, registry_cases
from .contracts import (
    ContractError,
    adaptive_counts,
    check_pipeline,
    check_placement,
    check_preset,
    check_selection,
    check_stage,
    compose_for_contract,
    contract_recipes,
)
from .models import llava_batch, llava_next_batch, qwen2_vl_batch, tiny_llava, tiny_llava_next, tiny_qwen2_vl
from .stages import NormOrder, kit_registry
from .signals import clustered_signals, grid_for, make_signals, make_video_signals, pad_signals, ragged_signals, signals_for, trim_row

__all__ = [
    "AdapterContractError",
    "ContractError",
    "StageCase",
    "adaptive_counts",
    "check_adapter",
    "check_case",
    "check_pipeline",
    "check_placement",
    "check_preset",
    "check_selection",
    "check_stage",
    "clustered_signals",
    "compose_for_contract",
    "contract_recipes",
    "grid_for",
    "kit_registry",
    "llava_batch",
    "llava_next_batch",
    "make_signals",
    "make_video_signals",
    "NormOrder",
    "pad_signals",
    "qwen2_vl_batch",
    "ragged_signals",
    "registry_cases",
    "signals_for",
    "tiny_llava",
    "tiny_llava_next",
    "tiny_qwen2_vl",
    "trim_row",
]
