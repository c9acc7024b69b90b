"""Built-in presets: named compositions of built-in stages."""

from __future__ import annotations

from vtprune.framework.registry import Registry

__all__ = ["ZSPAPRUNE_PAPER", "register_presets"]

ZSPAPRUNE_PAPER = "ZSPAPrune: Zero-Shot Prompt-Aware Token Pruning for Vision-Language Models (arXiv 2510.17197)"


def register_presets(registry: Registry) -> None:
    """Register ZSPAPrune and its ablation variants (peer presets live in their own module)."""
    add = registry.add_preset
    add(
        "zspaprune",
        "prompt_cosine(pool=mean)+critical+fps+split(critical=0.6)+pre_llm",
        "ZSPAPrune: top-k by cosine to the mean-pooled prompt, then farthest-point diversity",
        paper=ZSPAPRUNE_PAPER,
    )
    add("zspaprune_max", "prompt_cosine(pool=token_max)+critical+fps+split(critical=0.6)+pre_llm",
        "ZSPAPrune with per-token max prompt similarity instead of mean pooling", paper=ZSPAPRUNE_PAPER)
    add("zspaprune_attn", "attention+critical+fps+split(critical=0.6)+layer(k=2)",
        "ZSPAPrune with relevance from the last prompt token's attention at layer k-1", paper=ZSPAPRUNE_PAPER)
    add("zspaprune_kmeans", "prompt_cosine(pool=mean)+critical+kmeans+split(critical=0.6)+pre_llm",
        "ZSPAPrune with k-means diversity instead of farthest point", paper=ZSPAPRUNE_PAPER)
    add("zspaprune_grid", "prompt_cosine(pool=mean)+critical+grid+split(critical=0.6)+pre_llm",
        "ZSPAPrune with spatially uniform diversity tokens", paper=ZSPAPRUNE_PAPER)
    add("zspaprune_dynamic", "prompt_cosine(pool=mean)+critical+fps+dynamic+pre_llm",
        "ZSPAPrune with a per-sample critical/diversity split from the score distribution", paper=ZSPAPRUNE_PAPER)
    add("zspaprune_auto", "prompt_cosine(pool=mean)+critical+fps+gap+pre_llm",
        "ZSPAPrune whose critical share is chosen per image and prompt: the relevant set before the first relevance drop",
        paper=ZSPAPRUNE_PAPER)
