"""Peer methods as presets: compositions of built-in and peer stages (docs/methods.md)."""

from __future__ import annotations

from vtprune.framework.registry import Registry

__all__ = ["PEER_PRESETS", "register_peer_presets"]

#: name -> (recipe, description, paper, official code read)
PEER_PRESETS: dict[str, tuple[str, str, str, str]] = {
    "fastv": (
        "relevance.attention+critical.topk_official(op=topk)+diversity.none+budget.fastv+placement.layer(k=2)",
        "FastV: top-k by head-mean attention of the last prompt token at layer k-1, dropped before layer k",
        "Chen et al., An Image is Worth 1/2 Tokens After Layer 2, ECCV 2024 (arXiv 2403.06764)",
        "github.com/pkunlp-icler/FastV @ d1659729b5bf1be225e99ee15783deeea80f63b1",
    ),
    "pdrop": (
        "relevance.attention+critical.topk_official(op=topk)+diversity.none+budget.pdrop"
        "+placement.schedule(layers=[8, 16, 24], ratio=0.5)",
        "PyramidDrop: attention top-k at layers 8/16/24, each stage keeping int(ratio * present)",
        "Xing et al., PyramidDrop, CVPR 2025 (arXiv 2410.17247)",
        "github.com/Cooperx521/PyramidDrop @ 6444f304aee4b7edcb022839fb9e8cd07859704a",
    ),
    "visionzip": (
        "relevance.cls_attention(reduce=sum)+critical.topk_official(op=topk)+diversity.visionzip"
        "+budget.visionzip(dominant=54,contextual=10,keep_cls=False)+placement.vision",
        "VisionZip: dominant patches by CLS attention + contextual tokens merged in key space",
        "Yang et al., VisionZip: Longer is Better but Not Necessary in VLMs, CVPR 2025 (arXiv 2412.04467)",
        "github.com/dvlab-research/VisionZip @ 3151f6df4fca36a4cd1c985e5956e725b1f9ad02",
    ),
    "prumerge": (
        "relevance.none+critical.critical+diversity.prumerge(plus=False,neighbours=32)+budget.prumerge+placement.vision",
        "LLaVA-PruMerge: CLS-attention IQR outliers of the last CLIP layer (adaptive count, budget = cap), each merged "
        "with its 32 key-nearest tokens by attention; the rest summed into one extra token",
        "Shang et al., LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models (arXiv 2403.15388)",
        "github.com/42Shawn/LLaVA-PruMerge @ 097c04116a58465e4bcb58cec44a94018a68ff1a",
    ),
    "prumerge_plus": (
        "relevance.none+critical.critical+diversity.prumerge(plus=True,neighbours=32)+budget.prumerge+placement.vision",
        "LLaVA-PruMerge+: PruMerge's outliers plus spatially uniform samples, merged the same way (adaptive count, "
        "budget = cap)",
        "Shang et al., LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models (arXiv 2403.15388)",
        "github.com/42Shawn/LLaVA-PruMerge @ 097c04116a58465e4bcb58cec44a94018a68ff1a",
    ),
    "divprune": (
        "relevance.none+critical.critical+diversity.divprune+budget.divprune_ratio+placement.pre_llm",
        "DivPrune: max-min diversity greedy over the projected visual tokens",
        "Alvar et al., DivPrune: Diversity-based Visual Token Pruning for LMMs, CVPR 2025 (arXiv 2503.02175)",
        "github.com/vbdi/divprune @ 799e2d950aa01ba7860907f5a6d86061f885dca6",
    ),
    "cdpruner": (
        "relevance.clip_text+critical.critical+diversity.dpp(theta=None)+budget.split(critical=0.0)"
        "+placement.pre_llm_clip",
        "CDPruner: conditional DPP (CLIP instruction relevance x feature similarity), greedy MAP",
        "Zhang et al., Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs (arXiv 2506.10967)",
        "github.com/Theia-4869/CDPruner @ 9541616c40fcd5625de1cdb8ea6c33c129eb7864",
    ),
    "cdpruner_llm": (
        "relevance.llm_text(minmax=True)+critical.critical+diversity.dpp(theta=None)+budget.split(critical=0.0)"
        "+placement.pre_llm",
        "CDPruner without CLIP: relevance = cos(visual, mean prompt embedding) in LLM space, the paper's kernel and greedy MAP",
        "Zhang et al., Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs (arXiv 2506.10967)",
        "github.com/openvinotoolkit/openvino.genai @ da1db864d (relevance); github.com/Theia-4869/CDPruner @ 9541616c (kernel, greedy)",
    ),
    "cdpruner_ov": (
        "relevance.llm_text(minmax=False)+critical.critical+diversity.dpp_ov(relevance_weight=0.5,split_threshold=1)"
        "+budget.split(critical=0.0)+placement.pre_llm",
        "CDPruner as OpenVINO GenAI 2026.4 runs it: LLM-space relevance, kernel (1-w)S + w*r_i*S*r_j, split into halves",
        "Zhang et al., Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs (arXiv 2506.10967)",
        "github.com/openvinotoolkit/openvino.genai @ da1db864d, src/cpp/src/visual_language/cdpruner/",
    ),
    "cdpruner_ov_full": (
        "relevance.llm_text(minmax=False)+critical.critical+diversity.dpp_ov(relevance_weight=0.5,split_threshold=0)"
        "+budget.split(critical=0.0)+placement.pre_llm",
        "CDPruner as OpenVINO GenAI runs it with CDPRUNER_SPLIT_THRESHOLD=0: one kernel over all the image's tokens",
        "Zhang et al., Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs (arXiv 2506.10967)",
        "github.com/openvinotoolkit/openvino.genai @ da1db864d, src/cpp/src/visual_language/cdpruner/",
    ),
    "dart": (
        "relevance.key_norm+critical.topk_official(op=topk)+diversity.dart(pivot_text=4,faithful=False,"
        "image_token_start_index=35)+budget.dart(pivot_image=4)+placement.layer(k=2)",
        "DART: image/text pivots by key L1 norm; per pivot keep the least similar image tokens",
        "Wen et al., Stop Looking for Important Tokens in MLLMs: Duplication Matters More (arXiv 2502.11494)",
        "github.com/ZichenWen1/DART (read from fork xqy1111111/DART @ 5a19452fc173017191c247848673e0bde755695a)",
    ),
    "vispruner": (
        "relevance.cls_attention(reduce=mean)+critical.topk_official(op=argsort)+diversity.vispruner"
        "+budget.vispruner(important_ratio=0.5)+placement.vision",
        "VisPruner: important patches by CLS attention + duplicates removed from the rest",
        "Zhang et al., Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs, ICCV 2025 (arXiv 2412.01818)",
        "github.com/Theia-4869/VisPruner @ aefa01adc7c7ce6334e880c88225e90cede760d1",
    ),
    "fastervlm": (
        "relevance.cls_attention(reduce=mean)+critical.topk_official(op=topk)+diversity.none+budget.split(critical=1.0)"
        "+placement.pre_llm",
        "FasterVLM: head-mean CLS attention of the penultimate CLIP layer, top-k after the projector, raster order",
        "Zhang et al., [CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference "
        "Faster (arXiv 2412.01818v1)",
        "github.com/Theia-4869/FasterVLM @ f5d5f120",
    ),
    "tome": (
        "relevance.none+critical.critical+diversity.tome_merge+budget.split(critical=0.0)+placement.vision_layers",
        "ToMe: bipartite soft matching in every CLIP layer (class token protected, size-weighted merge, "
        "proportional attention); r per layer from the budget",
        "Bolya et al., Token Merging: Your ViT But Faster, ICLR 2023 (arXiv 2210.09461)",
        "github.com/facebookresearch/ToMe @ af95e4b1",
    ),
    "mustdrop": (
        "relevance.mustdrop_dual(global_thr=0.011,individual_thr=0.01,keep_rate=0.08)+critical.critical"
        "+diversity.none+budget.mustdrop_split"
        "+placement.decode(prefill='schedule(layers=[3,7,11,15],ratio=1.0)',layer=2,policy=final)",
        "MustDrop (LLM part): dual-attention filter + CLS key set before layers 3/7/11/15 (adaptive count, budget = cap), decode cache cut to the final set",
        "Liu et al., Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language Model (arXiv 2411.10803)",
        "github.com/liuting20/MustDrop @ 909afa53",
    ),
    "mustdrop_vision": (
        "relevance.none+critical.critical+diversity.local_merge(window=3)+budget.split(critical=0.0)+placement.vision",
        "MustDrop (vision part): similar 3x3 neighbourhoods of the patch grid averaged into one token",
        "Liu et al., Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language Model (arXiv 2411.10803)",
        "github.com/liuting20/MustDrop @ 909afa53",
    ),
    "fastvid": (
        "relevance.frame_attention+critical.critical+diversity.fastvid(c=8,tau=0.9,d=0.4,p=4,beta=0.6,seed=0)"
        "+budget.fastvid+placement.pre_llm",
        "FastVID: DySeg temporal segments, salient tokens per frame, density anchors merged per segment (video rows)",
        "Shen et al., FastVID: Dynamic Density Pruning for Fast Video Large Language Models (arXiv 2503.11187)",
        "github.com/LunarShen/FastVID @ a40a109c",
    ),
    "holitom": (
        "relevance.frame_attention+critical.critical+diversity.holitom(tau=0.8,d=0.0,beta=0.6,max_window=1024,seed=0)"
        "+budget.holitom+placement.pre_llm_layer(k=18,keep=0.5,layer_step=holitom,query=last)",
        "HoliTom: DP temporal windows, static tokens merged over time and by DPC-KNN, dynamic tokens by attention; "
        "similarity merge of half the visual tokens at layer 18",
        "Shao et al., HoliTom: Holistic Token Merging for Fast Video Large Language Models, NeurIPS 2025 (arXiv 2505.21334)",
        "github.com/cokeshao/HoliTom @ e9b2972f",
    ),
    "sparsevlm": (
        "relevance.sparsevlm_raters+critical.critical+diversity.recycle+budget.sparsevlm_rank"
        "+placement.sparse_layers(layers=[3, 7, 16])",
        "SparseVLM: text raters' attention at sparse layers 2/6/15, adaptive rank-rule count, pruned tokens recycled "
        "(clustered, merged, appended)",
        "Zhang et al., SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference, ICML 2025 "
        "(arXiv 2410.04417)",
        "github.com/Gumpest/SparseVLMs @ b72c5d62",
    ),
    "gprune": (
        "relevance.gprune(similarity=0.5,temperature=0.03,iterations=5)+critical.topk_official(op=topk)+diversity.none"
        "+budget.gprune+placement.pre_llm",
        "G-Prune: token norms propagated over each image's cosine graph (5 steps), top-k of the flow / degree",
        "Jiang et al., What Kind of Visual Tokens Do We Need? Training-free Visual Token Pruning for Multi-modal "
        "Large Language Models from the Perspective of Graph, AAAI 2025 (arXiv 2501.02268)",
        "github.com/jytmelon/G-Prune @ 762c6377, LLaVA-NeXT/llava/model/llava_arch.py",
    ),
    "vtw": (
        "relevance.none+critical.critical+diversity.none+budget.withdraw+placement.withdraw(k=15)",
        "VTW: every visual token withdrawn before decoder layer 15 (budget 0), the text goes on",
        "Lin et al., Boosting Multimodal Large Language Models with Visual Tokens Withdrawal for Rapid Inference, "
        "AAAI 2025 (arXiv 2405.05803)",
        "github.com/lzhxmu/VTW @ a3d8cfc3, llava/model/language_model/VTW.py",
    ),
    "fitprune": (
        "relevance.fitprune+critical.topk_official(op=sort_drop)+diversity.none+budget.split(critical=1.0)"
        "+placement.fitprune(tokens=576)",
        "FitPrune: a fitted per-layer recipe (default: the official LLaVA-1.5-7B 60% one); after each layer, the "
        "lowest head-max cross x self attention deleted; budget = tokens kept after layer 0 (562 = the recipe)",
        "Ye et al., Fit and Prune: Fast and Training-free Visual Token Pruning for Multi-modal Large Language Models, "
        "AAAI 2025 (arXiv 2409.10197)",
        "github.com/ywh187/FitPrune @ d28e418c920912b20dc888325651ecc6e214e6a1",
    ),
    "flowcut": (
        "relevance.flowcut+critical.topk_official(op=topk)+diversity.none+budget.split(critical=1.0)"
        "+placement.vision_layers",
        "FlowCut: CLS information-flow score in every CLIP layer before the feature layer (0.5/0.5 running blend), "
        "entropy-adaptive pruning every second layer, the budget reached at the layer before the feature layer",
        "Tong et al., Rethinking Redundancy via Information Flow for Efficient Vision-Language Models, NeurIPS 2025 "
        "(arXiv 2505.19536)",
        "github.com/TungChintao/FlowCut @ a2ecd247cb3c605773ec317a0c246425b47abdbe, flowcut/modeling_clip_flowcut.py",
    ),
    "random": (
        "relevance.none+critical.critical+diversity.randperm(seed=0)+budget.split(critical=0.0)+placement.pre_llm",
        "random baseline: seeded randperm of each row's tokens",
        "",
        "",
    ),
    "pooling": (
        "relevance.none+critical.critical+diversity.pooling+budget.split(critical=0.0)+placement.pre_llm",
        "average-pooling baseline: pool the patch grid to the budget (merged values)",
        "",
        "",
    ),
}


def register_peer_presets(registry: Registry) -> None:
    """Register every peer preset."""
    for name, (recipe, description, paper, code) in PEER_PRESETS.items():
        registry.add_preset(name, recipe, description, paper=paper, code=code)
