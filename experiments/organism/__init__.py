"""The embedded demo model organism: a synthetic visual QA task and a tiny trained LLaVA.

Public entry points
-------------------
* ``load_organism(dtype=torch.float32) -> (model, processor)``: the shipped
  ``LlavaForConditionalGeneration`` and ``LlavaProcessor`` loaded with ``from_pretrained``
  from ``WEIGHTS_DIR`` (inside this package).
  Both loaders refuse a checkpoint with missing / unexpected / mismatched keys (``loading``).
* ``load_qwen_organism(dtype, path)``: the Qwen2-VL organism (``QWEN_WEIGHTS_DIR``), same contract.
* ``task.make_split(split, n)``: deterministic samples ("train" / "validation" / "test").
* ``evaluate.answer`` / ``evaluate.evaluate``: greedy answers, accuracy, relevance AUC.
* ``train.train(TrainConfig)`` / ``train.main(argv)``: reproduce the weights.
"""

from __future__ import annotations

from .loading import QWEN_WEIGHTS_DIR, WEIGHTS_DIR, OrganismWeightsError, load_organism, load_qwen_organism

__all__ = ["QWEN_WEIGHTS_DIR", "WEIGHTS_DIR", "OrganismWeightsError", "load_organism", "load_qwen_organism"]
