"""Evaluation helpers for the model organism: answers, accuracy, prompt-relevance AUC.

Contract
--------
* ``answer`` runs greedy ``model.generate`` (so pruning hooks installed on the model run
  exactly as in real use) on single-turn prompts ``build_prompt(question)`` and returns
  the first generated word of each sample (``""`` if the model emitted ``</s>`` first).
* ``accuracy_by_template`` -> ``{"overall": acc, "<template>": acc, ...}`` in [0, 1].
* Prompt relevance of visual token ``i`` for a question = cosine similarity between the
  projected visual token (output of ``multi_modal_projector``, what LLaVA feeds the LLM)
  and the question's word input-embeddings, pooled over the question words (only the
  user's question words, no special or chat tokens) by mean of embeddings (``mean``) or
  by max over per-word cosines (``max``).
* ``relevance_auc`` pools, over samples with a non-empty ``target_objects``, the tokens
  covering a target object (positives) versus all other tokens, and returns ROC-AUC.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from .processor import build_prompt
from .task import Sample


def _prompt_builder(processor: LlavaProcessor):
    """``build_prompt`` for the LLaVA organism, ``build_qwen_prompt`` for the Qwen2-VL one."""
    from transformers import Qwen2VLProcessor

    if isinstance(processor, Qwen2VLProcessor):
        from .qwen_processor import build_qwen_prompt

        return build_qwen_prompt
    return build_prompt


def encode(processor: LlavaProcessor, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Processor inputs (left padded) for single-turn prompts of ``samples`` (either organism's processor)."""
    prompt = _prompt_builder(processor)
    return processor(
        images=[s.image for s in samples],
        text=[prompt(s.question) for s in samples],
        return_tensors="pt",
        padding=True,
    )


@torch.no_grad()
def answer(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    samples: Sequence[Sample],
    batch_size: int = 100,
    max_new_tokens: int = 2,
) -> list[str]:
    """Greedy-generated single-word answers, one per sample (order preserved)."""
    model.eval()
    out: list[str] = []
    dtype = next(model.parameters()).dtype
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        inputs = encode(processor, chunk)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)  # (B, T + new)
        new = gen[:, inputs["input_ids"].shape[1] :]  # (B, new)
        for row in processor.tokenizer.batch_decode(new, skip_special_tokens=True):
            words = row.split()
            out.append(words[0] if words else "")
    return out


def accuracy_by_template(samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, float]:
    """Overall and per-template exact-match accuracy."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for s, p in zip(samples, predictions, strict=True):
        ok = p == s.answer
        hits[s.template].append(ok)
        hits["overall"].append(ok)
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}


@torch.no_grad()
def projected_visual_tokens(
    model: LlavaForConditionalGeneration, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None
) -> torch.Tensor:
    """Projector outputs for a batch of images: (B, N, D_text) (Qwen2-VL: merger outputs, given ``image_grid_thw``)."""
    cfg = model.config
    if image_grid_thw is not None:
        out = model.model.get_image_features(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
        return torch.stack(list(out.pooler_output))  # (B, N, D)
    feats = model.model.get_image_features(
        pixel_values=pixel_values.to(next(model.parameters()).dtype),
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    )
    feats = getattr(feats, "pooler_output", feats)
    if isinstance(feats, (list, tuple)):
        feats = torch.stack(list(feats))
    return feats  # (B, N, D)


@torch.no_grad()
def prompt_relevance(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    samples: Sequence[Sample],
    batch_size: int = 100,
) -> dict[str, list[np.ndarray]]:
    """Per-sample relevance scores {"mean": [(N,)...], "max": [(N,)...]} (see module doc)."""
    emb = model.get_input_embeddings()
    tok = processor.tokenizer
    out: dict[str, list[np.ndarray]] = {"mean": [], "max": []}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        pix = processor.image_processor(images=[s.image for s in chunk], return_tensors="pt")
        vis = projected_visual_tokens(model, pix["pixel_values"], pix.get("image_grid_thw"))  # (B, N, D)
        vis = F.normalize(vis.float(), dim=-1)  # (B, N, D)
        for b, s in enumerate(chunk):
            ids = torch.tensor(tok.convert_tokens_to_ids(s.question.split()))  # (Q,)
            words = emb(ids).float()  # (Q, D)
            mean_q = F.normalize(words.mean(0), dim=-1)  # (D,)
            out["mean"].append((vis[b] @ mean_q).numpy())  # (N,)
            per_word = vis[b] @ F.normalize(words, dim=-1).T  # (N, Q)
            out["max"].append(per_word.max(1).values.numpy())  # (N,)
    return out


def relevance_auc(samples: Sequence[Sample], scores: Sequence[np.ndarray]) -> float:
    """ROC-AUC of target-object tokens vs all other tokens, pooled over samples with targets."""
    ys, ss = [], []
    for s, sc in zip(samples, scores, strict=True):
        if not s.target_objects:
            continue
        ys.append(np.isin(s.patch_labels, s.target_objects))
        ss.append(sc)
    y = np.concatenate(ys)
    return float(roc_auc_score(y, np.concatenate(ss)))


def evaluate(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    samples: Sequence[Sample],
    batch_size: int = 100,
) -> dict[str, object]:
    """Accuracy per template plus relevance AUCs (mean / max pooling)."""
    preds = answer(model, processor, samples, batch_size=batch_size)
    rel = prompt_relevance(model, processor, samples, batch_size=batch_size)
    return {
        "accuracy": accuracy_by_template(samples, preds),
        "auc_mean": relevance_auc(samples, rel["mean"]),
        "auc_max": relevance_auc(samples, rel["max"]),
        "n_samples": len(samples),
    }
