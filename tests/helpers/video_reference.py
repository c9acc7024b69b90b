"""Plain loop-style re-implementations of the official video methods, for tests (not used by the library).

``dycoke_ttm_reference``: KD-TAO/DyCoke @ dd746349 ``llava/model/llava_arch.py`` ``dycole_ttm`` written out frame
pair by frame pair on one flattened (T*P, D) video; returns the kept (frame, position) pairs. Ties: the lower
position first (vtprune's documented rule; the official ``topk`` leaves it unspecified).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dycoke_ttm_reference", "dycoke_decode_reference"]


def _lowest(similarity: torch.Tensor, count: int) -> list[int]:
    values = similarity.tolist()
    return sorted(sorted(range(len(values)), key=lambda j: (values[j], j))[:count])


def dycoke_ttm_reference(features: torch.Tensor, tokens_per_frame: int, merging_ratio: float = 0.3) -> dict[int, list[int]]:
    """{frame: kept positions within the frame} for one (T*P, D) video, as the official function keeps them.

    Differences from the official function kept on purpose (documented): an odd last frame is kept whole (the
    official pair loop loses it) and fewer than five frames skip the group-of-four pass (official: error)."""
    num_frames = features.shape[0] // tokens_per_frame
    ratio = 1 - merging_ratio
    keep_count = int(ratio * tokens_per_frame)
    frame = lambda t: features[t * tokens_per_frame : (t + 1) * tokens_per_frame].float()  # noqa: E731
    kept: dict[int, list[int]] = {t: list(range(tokens_per_frame)) for t in range(num_frames)}
    for i in range(0, num_frames - 1, 2):
        sim = F.cosine_similarity(F.normalize(frame(i), p=2, dim=1), F.normalize(frame(i + 1), p=2, dim=1), dim=1)
        kept[i] = list(range(tokens_per_frame))
        kept[i + 1] = _lowest(sim, keep_count)
    for i in range(0, num_frames - 4, 4):
        sim = F.cosine_similarity(frame(i), frame(i + 2), dim=1)
        kept[i] = list(range(tokens_per_frame))
        kept[i + 2] = _lowest(sim, keep_count)
    return kept


def dycoke_decode_reference(attentions: list[torch.Tensor], prune_ratio: float = 0.8, threshold: float = 0.9) -> list[list[int] | None]:
    """Per decoding step, the kept image-entry indices (None = the step sees every entry), from that step's image
    attention vector at layer ``dycoke_l - 1`` (``PrunableDynamicCache.dycoke_pruning`` / ``update_cache``)."""
    previous = None
    out: list[list[int] | None] = []
    for attention in attentions:
        similarity = 0.0 if previous is None else float(F.cosine_similarity(attention, previous, dim=0))
        previous = attention
        if similarity < threshold:
            count = int(attention.shape[0] * (1 - prune_ratio))
            values = attention.tolist()
            out.append(sorted(sorted(range(len(values)), key=lambda j: (-values[j], j))[:count]))
        else:
            out.append(None)
    return out
