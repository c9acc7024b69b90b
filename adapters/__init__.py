"""vtprune.adapters: attach pruning pipelines to real Hugging Face VLMs (see docs/adapters.md).

An adapter is a *description* of a model family (``description.VLMAdapter``); one hook runtime attaches any
description (``runtime``: `Attachment`, `attach`), building a per-forward drop plan from data (``plan``).

- shared pieces: ``records`` (`DropRecord`, `PruneResult`, `ImageLayout`), ``spans`` (image / prompt spans),
  ``capture`` (vision-side capture), ``mrope`` (Qwen M-RoPE positions), ``clip_signals`` (CLIP-space signals for
  ``pre_llm_clip``, CDPruner), ``deepstack`` (Qwen3-VL DeepStack); ``base`` re-exports the old names;
- decoder machinery, model-agnostic: ``decoder`` (`DecoderPruner`), ``decoder_spec``, ``segments``,
  ``attention_rows``;
- families, one module each: ``llava``, ``llava_next``, ``llava_onevision``, ``qwen2_vl`` (Qwen2-VL and
  Qwen2.5-VL), ``qwen3_vl`` (Qwen3-VL), ``llava_next_video``, ``video_llava``; ``generic`` (any VLM with the
  standard multimodal interface, chosen through its ``accepts(model)`` probe when no adapter names the class);
  ``plugin`` registers them. The support check is
  ``vtprune.framework.support``.
"""
