"""PyramidDrop (Xing et al., CVPR 2025): rank-and-drop of image tokens at several LLM layers.

Official code: github.com/Cooperx521/PyramidDrop @ 6444f304aee4b7edcb022839fb9e8cd07859704a,
``llava/model/modeling_llama_pdrop.py`` (``LlamaModel.pdrop_forward`` / ``pdrop_rank_drop``) and
``llava/eval/model_vqa_loader.py`` (the ratio list), ``scripts/v1_5/pdrop_eval/*.sh`` (defaults
``--layer_list [8,16,24] --image_token_ratio_list [0.5,0.25,0.125]``).

Rules reproduced:
* After decoder layer ``l`` (1-based count ``rank_layer = layer_idx + 1`` in ``layer_list``), i.e.
  *before* 0-based layer ``rank_layer``, the tokens are scored with that next layer's own q/k
  (its input RMSNorm, q/k projections, RoPE), ``softmax(q k^T / sqrt(d) + causal_mask)`` in fp32
  then cast back to the model dtype; query = the last instruction token (the last prompt token at
  inference); mean over heads, slice the image tokens, mean over the (single) query.
* The ratio list is CUMULATIVE w.r.t. the ORIGINAL image-token count: ``[1.0] + ratios`` and the
  count kept at stage s is ``int(N0 * ratio_list[s + 1])`` (truncation), NOT ``int(prev * lam)``.
* ``attention_avg_text.topk(keep).indices`` then sorted (positional order kept).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor

from .common import CountLike, topk_keep

__all__ = ["pdrop_stage_counts", "pdrop_scores", "pdrop_select"]


def pdrop_stage_counts(
    n_tokens: int,
    layers: Sequence[int] = (8, 16, 24),
    ratio: Union[float, Sequence[float]] = 0.5,
) -> list[int]:
    """Image tokens kept after each PyramidDrop stage.

    Args:
        n_tokens: image tokens entering the LLM (N0, e.g. 576).
        layers: the ``layer_list`` (1-based layer counts after which a stage drops tokens).
        ratio: either lambda (float): cumulative ratios ``lambda ** (s + 1)`` (Python float power),
            or the official ``image_token_ratio_list`` itself (one cumulative ratio per layer, e.g.
            ``[0.5, 0.25, 0.125]``), which is what the official scripts pass.

    Returns:
        ``[int(n_tokens * r_s) for each stage s]``: official ``keep_length``, truncating toward 0.
    """
    if isinstance(ratio, (int, float)):
        ratios = [float(ratio) ** (s + 1) for s in range(len(layers))]
    else:
        ratios = [float(r) for r in ratio]
        if len(ratios) != len(layers):
            raise ValueError(f"{len(ratios)} ratios for {len(layers)} layers")
    return [int(n_tokens * r) for r in ratios]


def pdrop_scores(attention: Tensor) -> Tensor:
    """(B, N) PyramidDrop score from attention (B, H, N) or (B, H, Q, N).

    Official order: mean over heads first, then (after slicing the image tokens) mean over the
    query tokens (a single query, the last instruction token, at inference).
    """
    if attention.dim() == 3:
        attention = attention.unsqueeze(2)  # (B, H, 1, N)
    return attention.mean(dim=1).mean(dim=1)  # (B, N)


def pdrop_select(attention: Tensor, counts: CountLike, valid: Optional[Tensor] = None) -> Tensor:
    """One PyramidDrop stage: keep the top-``counts`` of the still-present image tokens.

    Args:
        attention: (B, H, N) (or (B, H, Q, N)) softmax attention of the last instruction token at
            the stage's layer, over the whole sequence, restricted to the visual tokens.
        counts: int or (B,) long (see :func:`pdrop_stage_counts`).
        valid: (B, N) bool, the tokens still present (earlier stages' survivors) or None.

    Returns:
        (B, N) bool keep mask (``torch.topk`` on the valid slice, as official).
    """
    return topk_keep(pdrop_scores(attention), counts, valid)  # (B, N)
