"""Video presets (issue 15): DyCoke and PruneVid as compositions of stages (docs/methods.md)."""

from __future__ import annotations

from vtprune.framework.registry import Registry

__all__ = ["DYCOKE_PAPER", "DYCOKE_RECIPE", "PRUNEVID_PAPER", "PRUNEVID_RECIPE", "register_video_presets"]

DYCOKE_PAPER = "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models (Tao et al., CVPR 2025, arXiv 2411.15024)"
#: DyCoke's defaults (``builder.py`` ``load_pretrained_model``): ``dycoke_k=0.3`` (TTM), ``dycoke_l=3`` (decode
#: pruning from layer 3, scored at layer 2), ``dycoke_p=0.8`` (fraction hidden), similarity threshold 0.9.
DYCOKE_RECIPE = (
    "dycoke_ttm(k=0.3)+critical+mustdrop_fill+mustdrop_split"
    "+decode(prefill=pre_llm,layer=3,policy=dycoke,prune_ratio=0.8,threshold=0.9)"
)

PRUNEVID_PAPER = "PruneVid: Visual Token Pruning for Efficient Video Large Language Models (Huang, Zhou, Han, ACL 2025, arXiv 2412.16117)"
#: PruneVid's defaults (``scripts/eval.sh``): ``tau=0.8``, ``temporal_segment_ratio=0.25``, ``cluster_ratio=0.5``,
#: ``selected_layer=10``, ``alpha=0.4``; DPC-KNN ``k=7``. The method sets its own count: run it with budget 1.0.
PRUNEVID_RECIPE = (
    "relevance.none+critical+diversity.prunevid(tau=0.8,cluster_ratio=0.5,segment_ratio=0.25,k=7,seed=0)"
    "+budget.prunevid+prunevid_layer(k=11,alpha=0.4,score=official)"
)


def register_video_presets(registry: Registry) -> None:
    """Register the video presets."""
    registry.add_preset(
        "dycoke",
        DYCOKE_RECIPE,
        "DyCoke: temporal token merging across frames before the LLM, then dynamic KV-cache pruning while decoding",
        paper=DYCOKE_PAPER,
    )
    registry.add_preset(
        "prunevid",
        PRUNEVID_RECIPE,
        "PruneVid: temporal segments, static tokens merged over time, DPC-KNN spatial merging, then prompt-attention pruning at layer 10",
        paper=PRUNEVID_PAPER,
    )
