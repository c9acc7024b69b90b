"""vtprune.adapters: attach pruning pipelines to real Hugging Face VLMs (see docs/adapters.md).

- ``decoder``: model-agnostic machinery that drops tokens inside a decoder stack (masks, positions, KV cache,
  recomputed attention rows), reusable by any adapter.
- ``base``: the shared LLaVA-family runtime (image / prompt spans, `Signals`, records).
- ``llava``, ``llava_next``: the adapters; ``plugin``: their registration.
"""
