"""vtprune.adapters: attach pruning pipelines to real Hugging Face VLMs (see docs/adapters.md).

- ``decoder``: model-agnostic machinery that drops tokens inside a decoder stack (masks, positions, KV cache,
  recomputed attention rows), reusable by any adapter.
- ``base``: the shared LLaVA-family runtime (image / prompt spans, `Signals`, records).
- ``clip_signals``: CLIP-space signals (``clip_visual``, ``clip_text``) for the ``pre_llm_clip`` placement (CDPruner).
- ``llava``, ``llava_next``, ``llava_onevision``, ``qwen2_vl`` (Qwen2-VL and Qwen2.5-VL), ``qwen3_vl`` (Qwen3-VL,
  DeepStack features pruned with the tokens): the adapters; ``plugin``: their registration.
"""
