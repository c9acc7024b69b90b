"""Pure tensor re-implementations of peer visual-token-pruning methods.

Every function here is model-free: it takes batch-first tensors (the `Signals` fields) and returns
a (B, N) bool keep mask (plus replacement values for merge methods). Rows are processed
independently, so a row's result never depends on the other rows of the batch. See
docs/peers-notes.md for the official code each function follows.
"""

from __future__ import annotations

from . import common, cdpruner, dart, divprune, fastv, fitprune, pdrop, pooling, random_prune, vispruner, visionzip
from .cdpruner import cdpruner_kernel, cdpruner_relevance, cdpruner_select
from .dart import dart_select, dart_token_topk
from .divprune import divprune_keep_count, divprune_sequence, divprune_select
from .fastv import fastv_keep_count, fastv_scores, fastv_select
from .fitprune import fitprune_scores, fitprune_search, fitprune_sort_drop, fitprune_sort_drop_indices
from .pdrop import pdrop_scores, pdrop_select, pdrop_stage_counts
from .pooling import pooled_grid_shape, pooling_select
from .random_prune import random_select
from .vispruner import vispruner_counts, vispruner_select
from .visionzip import visionzip_select

__all__ = [
    "common",
    "cdpruner",
    "dart",
    "divprune",
    "fastv",
    "fitprune",
    "pdrop",
    "pooling",
    "random_prune",
    "vispruner",
    "visionzip",
    "cdpruner_kernel",
    "cdpruner_relevance",
    "cdpruner_select",
    "dart_select",
    "dart_token_topk",
    "divprune_keep_count",
    "divprune_sequence",
    "divprune_select",
    "fastv_keep_count",
    "fastv_scores",
    "fastv_select",
    "fitprune_scores",
    "fitprune_search",
    "fitprune_sort_drop",
    "fitprune_sort_drop_indices",
    "pdrop_scores",
    "pdrop_select",
    "pdrop_stage_counts",
    "pooled_grid_shape",
    "pooling_select",
    "random_select",
    "vispruner_counts",
    "vispruner_select",
    "visionzip_select",
]
