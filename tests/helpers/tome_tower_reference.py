"""The independent reference of ToMe inside a CLIP tower (placement ``vision_layers``), shared by the LLaVA-1.5,
LLaVA-NeXT and Video-LLaVA tests, written without vtprune code.

- :func:`tiny_llava_deep_tower` / :func:`tiny_llava_next_deep_tower` / :func:`tiny_video_llava_deep_tower`: the tiny
  models with a 5-layer CLIP tower (feature layer -2: 4 merging layers, 16 patches per image / crop) and 2 Llama
  layers.
- :func:`reference_features`: the official ToMe block (tome/patch/timm.py ``ToMeBlock`` / ``ToMeAttention``
  @ af95e4b1) written out with the tower's own weights: merge between attention and MLP, keys averaged over heads,
  class token protected, ``log(size)`` added to the logits.
- :func:`first_slots_reference`: the LLM input with each image's merged tokens in its first placeholder slots and its
  other placeholders gone; :func:`left_pad_kept`: any such reduced sequence, left padded.
- :func:`run_tome_in_tower`: the pruned forward, selection and ``generate`` of ``tome+placement.vision_layers(r=2)``
  (hooks removed cleanly afterwards);
- :func:`greedy`: greedy decoding by full re-runs on ``inputs_embeds``; :func:`check_first_slots_reference`: the
  pruned logits and ``generate`` against that reference.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from adapter_fixtures import PAD_ID, generation_positions, record_hooks, tiny_video_llava
from vtprune import framework
from vtprune.testing.models import finish_tiny, tiny_clip_config, tiny_llama_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "strategies"))
from test_tome import official_matching, official_source, official_wavg  # noqa: E402

__all__ = [
    "check_first_slots_reference",
    "first_slots_reference",
    "greedy",
    "left_pad_kept",
    "reference_features",
    "run_tome_in_tower",
    "tiny_llava_deep_tower",
    "tiny_llava_next_deep_tower",
    "tiny_video_llava_deep_tower",
]

TOWER_LAYERS = 5  # feature layer -2: 4 merging layers
LLM_LAYERS = 2


def _deep_tower_config(**extra) -> dict:
    """Keyword arguments of a LLaVA-style config with the 5-layer tower (``extra``: the family's own fields)."""
    return dict(
        vision_config=tiny_clip_config(num_hidden_layers=TOWER_LAYERS),
        text_config=tiny_llama_config(num_hidden_layers=LLM_LAYERS),
        image_token_id=95,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        **extra,
    )


def tiny_llava_deep_tower(attn: str = "eager", seed: int = 0):
    """The tiny LLaVA with a 5-layer CLIP tower (feature layer -2: 4 merging layers)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(**_deep_tower_config())
    torch.manual_seed(seed)
    return finish_tiny(LlavaForConditionalGeneration(config), attn, PAD_ID, torch.float32)


def tiny_llava_next_deep_tower(attn: str = "eager", seed: int = 0):
    """The tiny LLaVA-NeXT with a 5-layer CLIP tower (feature layer -2: 4 merging layers, 16 patches per crop)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(**_deep_tower_config(image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]]))
    torch.manual_seed(seed)
    return finish_tiny(LlavaNextForConditionalGeneration(config), attn, PAD_ID, torch.float32)


def tiny_video_llava_deep_tower(attn: str = "eager", seed: int = 0):
    """A random Video-LLaVA with 5-layer CLIP towers (feature layer -2: 4 merging layers, 16 patches per image)."""
    return tiny_video_llava(attn, seed, layers=LLM_LAYERS, num_hidden_layers=TOWER_LAYERS)


def reference_features(model, pixel_values, schedule, tower=None):
    """(images, k, D) projected tokens and (images, N) patch -> slot, by the official ToMe block (``tower``: the
    CLIP tower, default ``model.model.vision_tower``)."""
    tower = model.model.vision_tower if tower is None else tower
    vision = getattr(tower, "vision_model", tower)
    x = vision.pre_layrnorm(vision.embeddings(pixel_values))
    size, source = None, None
    heads = model.config.vision_config.num_attention_heads
    for layer, r in zip(vision.encoder.layers, schedule):
        attn = layer.self_attn
        normed = layer.layer_norm1(x)
        batch, tokens, width = normed.shape
        q = attn.q_proj(normed).view(batch, tokens, heads, -1).transpose(1, 2)
        k = attn.k_proj(normed).view(batch, tokens, heads, -1).transpose(1, 2)
        v = attn.v_proj(normed).view(batch, tokens, heads, -1).transpose(1, 2)
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, width)
        x = x + attn.out_proj(out)
        merge = official_matching(k.mean(1), r, class_token=True)
        source = official_source(merge, x, source)
        x, size = official_wavg(merge, x, size)
        x = x + layer.mlp(layer.layer_norm2(x))
    projected = model.model.multi_modal_projector(x[:, 1:])
    return projected, source.argmax(dim=1)[:, 1:] - 1, size[:, 1:, 0]


def left_pad_kept(embeds, mask, drop):
    """(embeds, mask, positions) of the sequence without its ``drop`` tokens (B, L) bool, left padded; positions
    are those of the full sequence (``generation_positions`` of ``mask``)."""
    positions = generation_positions(mask)
    rows_keep = [(~drop[b]).nonzero().flatten() for b in range(mask.shape[0])]
    width = max(r.numel() for r in rows_keep)
    ref_embeds = torch.zeros(mask.shape[0], width, embeds.shape[-1])  # (B, L', D)
    ref_mask = torch.zeros(mask.shape[0], width, dtype=torch.long)  # (B, L')
    ref_pos = torch.zeros(mask.shape[0], width, dtype=torch.long)  # (B, L')
    for b, keep in enumerate(rows_keep):
        ref_embeds[b, width - keep.numel() :] = embeds[b, keep]
        ref_mask[b, width - keep.numel() :] = mask[b, keep]
        ref_pos[b, width - keep.numel() :] = positions[b, keep]
    return ref_embeds, ref_mask, ref_pos


def first_slots_reference(model, inputs, projected):
    """(embeds, mask, positions) of the reduced sequence, left padded: each image's (k, D) merged tokens in its first
    k placeholder slots, its other placeholders gone (images in placeholder order, all of one token count)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    images, kept, _ = projected.shape
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    flat = (ids == model.config.image_token_id).nonzero()
    per_image = flat.shape[0] // images
    drop = torch.zeros_like(ids, dtype=torch.bool)
    for number in range(images):
        rows = flat[number * per_image : (number + 1) * per_image]
        embeds[rows[:kept, 0], rows[:kept, 1]] = projected[number]
        drop[rows[kept:, 0], rows[kept:, 1]] = True
    return left_pad_kept(embeds, mask, drop)


def greedy(model, embeds, mask, positions, steps):
    """Greedy decoding by full re-runs on ``inputs_embeds`` (no cache): (B, steps) token ids."""
    table = model.get_input_embeddings()
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[:, -1].argmax(-1)
            out.append(token)
            embeds = torch.cat([embeds, table(token)[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    return torch.stack(out, dim=1)


def check_first_slots_reference(model, inputs, projected, pruned, generated, steps: int = 4) -> None:
    """The pruned forward's last logits equal, within 1e-5, the model fed :func:`first_slots_reference` of the
    official block's ``projected`` tokens, and ``generate``'s first ``steps`` tokens equal :func:`greedy` on it."""
    ref_embeds, ref_mask, ref_pos = first_slots_reference(model, inputs, projected)
    with torch.no_grad():
        reference = model(inputs_embeds=ref_embeds, attention_mask=ref_mask, position_ids=ref_pos).logits
    torch.testing.assert_close(pruned[:, -1], reference[:, -1], atol=1e-5, rtol=1e-5)
    new_tokens = generated[:, inputs["input_ids"].shape[1] :]
    assert torch.equal(new_tokens, greedy(model, ref_embeds, ref_mask, ref_pos, steps))  # generate == greedy


def run_tome_in_tower(model, inputs, registry, features: Optional[Callable[[], torch.Tensor]] = None):
    """(pruned logits, ``last_selection``, ``generate``'s 4 greedy tokens' sequences, ``features()`` or None) under
    ``tome+placement.vision_layers(r=2)`` at budget 1, ``features`` (e.g. the tower + projector output) evaluated
    while pruned; asserts every hook is gone afterwards."""
    with torch.no_grad():
        model(**inputs, output_hidden_states=True)  # transformers installs its output-recording hooks once
    before = record_hooks(model)
    with framework.prune(model, "tome+placement.vision_layers(r=2)", budget=1, registry=registry) as handle, torch.no_grad():
        pruned = model(**inputs, position_ids=generation_positions(inputs["attention_mask"])).logits
        result = handle.last_selection
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        tower = None if features is None else features()
    assert record_hooks(model) == before
    return pruned, result, generated, tower
