"""The embedded demo model organism: a synthetic visual QA task and a tiny trained LLaVA.

Public entry points
-------------------
* ``load_organism(dtype=torch.float32) -> (model, processor)``: the shipped
  ``LlavaForConditionalGeneration`` and ``LlavaProcessor`` loaded with ``from_pretrained``
  from ``WEIGHTS_DIR`` (inside this package).
* ``task.make_split(split, n)``: deterministic samples ("train" / "validation" / "test").
* ``evaluate.answer`` / ``evaluate.evaluate``: greedy answers, accuracy, relevance AUC.
* ``train.train(TrainConfig)`` / ``train.main(argv)``: reproduce the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights"

__all__ = ["WEIGHTS_DIR", "load_organism"]


def load_organism(
    dtype: torch.dtype = torch.float32, path: str | Path | None = None
) -> tuple["LlavaForConditionalGeneration", "LlavaProcessor"]:
    """Load the shipped organism (model in eval mode, cast to ``dtype``) and its processor.

    Raises ``FileNotFoundError`` if the weights directory has no model.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    root = Path(path) if path is not None else WEIGHTS_DIR
    if not (root / "config.json").exists():
        raise FileNotFoundError(f"no organism weights in {root}; run `python -m vtprune.experiments.organism.train`")
    model = LlavaForConditionalGeneration.from_pretrained(root, dtype=dtype).eval()
    processor = AutoProcessor.from_pretrained(root)
    return model, processor
