"""Which shipped organism the demo grid runs: ``vtprune demo --organism {llava,qwen2_vl}``.

Contract
--------
``demo_overrides(organism)`` returns the ``(dotted key, value)`` overrides of ``experiments/configs/demo.yaml``
that point its model at the chosen organism: nothing for ``llava`` (the grid's own model), the Qwen2-VL
organism's weights (``pkg:vtprune.experiments.organism/weights_qwen2_vl``), prompt and a separate output folder
for ``qwen2_vl``. An unknown name raises ``ValueError`` naming the valid choices.
"""

from __future__ import annotations

from typing import Any

from .qwen_processor import build_qwen_prompt

__all__ = ["DEMO_ORGANISMS", "demo_overrides"]

DEMO_ORGANISMS: tuple[str, ...] = ("llava", "qwen2_vl")

_QWEN = (
    ("model.name", "pkg:vtprune.experiments.organism/weights_qwen2_vl"),
    ("model.prompt_template", build_qwen_prompt("{question}")),
    ("output_dir", "results/demo_qwen2_vl"),
)


def demo_overrides(organism: str) -> list[tuple[str, Any]]:
    """Overrides of the demo grid that select ``organism`` (see the module docstring)."""
    if organism not in DEMO_ORGANISMS:
        raise ValueError(f"unknown organism {organism!r}; valid: {', '.join(DEMO_ORGANISMS)}")
    return [] if organism == DEMO_ORGANISMS[0] else list(_QWEN)
