"""The adapter hints (``Stage.adapter_hints``): names a stage declares when a method's official code fixes *how* an
adapter computes a signal (docs/adapters.md, "Adapter hints"). Defined once here, read by the stages that declare
them (strategies/) and by the runtime that honours them (adapters/plan.py); adapters that do not know a hint ignore it.
"""

from __future__ import annotations

__all__ = [
    "HINT_FINAL_NORM", "HINT_OWN_LAYER", "HINT_APPEND_MERGED", "HINT_LAST_QUERY", "HINT_PLAIN_PROMPT",
    "HINT_INPUT_EMBEDDINGS", "HINT_FULL_WIDTH_CLS",
]

HINT_FINAL_NORM = "final_norm"  # in-LLM visual / prompt = hidden states through the decoder's final norm (DART)
HINT_OWN_LAYER = "own_layer_scoring"  # layer(k) attention / keys from layer k's own weights on its input (PyramidDrop)
HINT_APPEND_MERGED = "append_merged"  # merged (non-critical, valued) kept tokens written after the critical ones (SparseVLM)
HINT_LAST_QUERY = "last_token_query"  # the query token is the sequence's last real token, not the last prompt token (HoliTom)
HINT_PLAIN_PROMPT = "plain_prompt_attention"  # prompt_attention = softmax(q k^T / sqrt(d)) before RoPE, no causal mask (PruneVid)
HINT_INPUT_EMBEDDINGS = "input_embeddings"  # in-LLM drops also give input_visual / input_prompt (SparseVLM's raters)
# at vision: cls_attention / visual_keys from the tower layer after the feature layer, the CLS row as ONE head over the
# full width, softmax(q k^T * D ** -0.5), keys = the full k_proj output (PruMerge's layers[23] q/k hooks)
HINT_FULL_WIDTH_CLS = "full_width_cls_attention"
