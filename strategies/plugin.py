"""The built-in stages and presets, registered through the same hooks as third-party plugins."""

from __future__ import annotations

from vtprune.framework.hookspecs import hookimpl
from vtprune.framework.registry import Registry

from . import budget, critical, decode, diversity, placement, relevance
from .gprune import GPRUNE_STAGES
from .fitprune import FITPRUNE_STAGES
from .flowcut import FLOWCUT_STAGES
from .mustdrop import MUSTDROP_STAGES
from .prumerge import PRUMERGE_STAGES
from .sparsevlm import SPARSEVLM_STAGES
from .peer_presets import register_peer_presets
from .merge_stages import MERGE_STAGES
from .peer_stages import PEER_STAGES
from .ov_stages import OV_STAGES
from .presets import register_presets
from .video import DENSITY_VIDEO_STAGES
from .video_presets import register_video_presets
from .video_stages import VIDEO_STAGES
from .withdraw import VTW_STAGES

__all__ = ["BUILTIN_STAGES", "vtprune_register_stages", "vtprune_register_presets"]

BUILTIN_STAGES = (
    relevance.PromptCosine,
    relevance.AttentionRelevance,
    relevance.LastTokenAttention,
    relevance.RandomRelevance,
    relevance.NoRelevance,
    critical.TopKCritical,
    diversity.FarthestPoint,
    diversity.KMeansDiversity,
    diversity.RandomDiversity,
    diversity.GridDiversity,
    diversity.NoDiversity,
    budget.FixedSplit,
    budget.DynamicSplit,
    budget.AutoSplit,
    budget.GapSplit,
    placement.PreLLM,
    placement.AtLayer,
    placement.Schedule,
    placement.VisionOutput,
    decode.DecodePlacement,
    *PEER_STAGES,
    *OV_STAGES,
    *MERGE_STAGES,
    *MUSTDROP_STAGES,
    *PRUMERGE_STAGES,
    *DENSITY_VIDEO_STAGES,
    *SPARSEVLM_STAGES,
    *FITPRUNE_STAGES,
    *VIDEO_STAGES,
    *GPRUNE_STAGES,
    *VTW_STAGES,
    *FLOWCUT_STAGES,
)


@hookimpl
def vtprune_register_stages(registry: Registry) -> None:
    for stage in BUILTIN_STAGES:
        registry.add_stage(stage)


@hookimpl
def vtprune_register_presets(registry: Registry) -> None:
    register_presets(registry)
    register_peer_presets(registry)
    register_video_presets(registry)
