"""Old import path of the shared adapter pieces, re-exported from the modules that own them.

- ``description``: `VLMAdapter` (a model family's description) and `Extension`;
- ``runtime``: `Attachment` / `attach` (the one hook runtime);
- ``plan``: the per-forward drop plan; ``capture``: vision capture (`VisionCapture`, `clip_cls_rows`);
- ``records``: `DropRecord`, `PruneResult`, `ImageLayout`; ``spans``: `prompt_positions` and the other span rules;
- ``vtprune.framework.support``: `check_support` and the signal name sets.
"""

from __future__ import annotations

from vtprune.framework.support import (
    CLIP_SIGNALS,
    CLS_SIGNALS,
    EMBEDDING_SIGNALS,
    LAYER_SIGNALS,
    VISION_SIGNALS,
    check_support,
)

from .capture import VisionCapture, clip_cls_rows
from .description import Extension, VLMAdapter
from .plan import HINT_FINAL_NORM, HINT_OWN_LAYER, ForwardCall, Plan
from .records import DropRecord, ImageLayout, PruneResult
from .runtime import Attachment, attach, pipeline_hints, pipeline_keeps_cls
from .spans import find_subsequence, prompt_positions

__all__ = [
    "VLMAdapter",
    "Extension",
    "Attachment",
    "attach",
    "Plan",
    "ForwardCall",
    "DropRecord",
    "PruneResult",
    "ImageLayout",
    "VisionCapture",
    "prompt_positions",
    "find_subsequence",
    "clip_cls_rows",
    "check_support",
    "pipeline_hints",
    "pipeline_keeps_cls",
    "EMBEDDING_SIGNALS",
    "LAYER_SIGNALS",
    "VISION_SIGNALS",
    "CLS_SIGNALS",
    "CLIP_SIGNALS",
    "HINT_FINAL_NORM",
    "HINT_OWN_LAYER",
]
