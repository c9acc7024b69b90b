"""An independent reference of FlowCut inside a CLIP tower, written without vtprune code: the official encoder loop
re-told step by step with the tower's own weights.

Source read: github.com/TungChintao/FlowCut @ a2ecd247cb3c605773ec317a0c246425b47abdbe,

- ``flowcut/modeling_clip_flowcut.py``: ``CLIPAttention_forward`` (queries scaled before the product, the CLS
  value's unscaled products with every value softmaxed per head, the head-mean of the values kept),
  ``CLIPEncoderLayer_forward`` (after the MLP: score, blend, prune at even ``rpl``), ``CLIPEncoder_forward``
  (``rpl = select_layer - idx - 1``, the running score and the kept indices threaded through the layers),
  ``apply_flowcut_config`` (``select_layer = len(layers) - 2``);
- ``flowcut/utils_flowcut.py``: ``compute_score`` and ``adaptive_prune_ratio`` (the count shared by the batch:
  ``r.max(0)``; call the reference one image at a time for per-image counts);
- ``flowcut/main.py`` ``flowcut``: ``target = target_num + 1`` for LLaVA-1.5 (``select_feature == 'patch'``).

The operations follow the official order; everything is float32 here (the official model runs float16).

- :func:`tiny_llava_flowcut_tower`: a tiny LLaVA with a deeper CLIP tower whose attention is sharpened so that the
  entropy-adaptive layers do prune;
- :func:`reference_flowcut`: the official loop: the feature layer's states, the kept patch indices, the count
  kept at each pruning layer; given several images it is the official batched code (one ``r.max(0)`` per pruning
  layer: every image prunes the batch's count), given one image the per-image count;
- :func:`reference_projected`: the projector output the LLM receives per image (images one at a time, or with
  ``batched`` all in one official batched run);
- :func:`video_llava_image_inputs`: a left-padded batch of images (and optionally one video) for the tiny Video-LLaVA.
"""

from __future__ import annotations

import math

import torch

from adapter_fixtures import BOS_ID, IMAGE_TOKEN_ID, PAD_ID, left_pad
from vtprune.testing.models import finish_tiny, tiny_clip_config, tiny_llama_config

__all__ = [
    "tiny_llava_flowcut_tower",
    "reference_flowcut",
    "reference_projected",
    "video_llava_image_inputs",
    "official_score",
    "official_prune_count",
    "layer_with_signals",
]

VIDEO_TOKEN_ID = 94  # the tiny Video-LLaVA's video placeholder


def tiny_llava_flowcut_tower(attn: str = "eager", seed: int = 0, tower_layers: int = 9, image_size: int = 56, sharpen: float = 50.0):
    """A random ``LlavaForConditionalGeneration`` with a ``tower_layers``-layer CLIP tower (feature layer -2), images of
    ``image_size`` px (patch 7: ``(image_size / 7) ** 2`` patches) and the tower's query weights multiplied by
    ``sharpen`` (peaked CLS attention, so the entropy-adaptive counts are not all 0)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=tiny_clip_config(num_hidden_layers=tower_layers, image_size=image_size),
        text_config=tiny_llama_config(num_hidden_layers=2),
        image_token_id=95,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        tower = model.model.vision_tower
        for layer in getattr(tower, "vision_model", tower).encoder.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.q_proj.bias.mul_(sharpen)
    return finish_tiny(model, attn, PAD_ID, torch.float32)


def _share(x):
    """Each entry's share of its row's sum."""
    return x / x.sum(dim=-1, keepdim=True)


def official_score(cls_attention, semantic, value_mean):
    """``compute_score``: (relation share + semantic share) times the L1 norm of the head-mean value."""
    return (_share(cls_attention) + _share(semantic)) * torch.norm(value_mean, p=1, dim=-1)


def official_prune_count(cls_attention, rpl, kept_patches):
    """``adaptive_prune_ratio``: patches to prune, one count for the whole batch (the largest row's)."""
    patches = cls_attention.shape[-1]
    prob = _share(cls_attention)
    entropy = -torch.sum(prob * torch.log(prob), dim=-1)
    ratio = entropy / torch.log(torch.tensor(patches))
    asked = (patches - kept_patches) / rpl**0.5 * (1 - ratio**2)
    if asked.shape[0] > 1:
        asked = asked.max(0).values
    return int(asked.round())


def layer_with_signals(layer, hidden, heads):
    """One CLIP encoder layer written out as the official attention does it; also returns the (B, H, T, T) attention,
    the (B, H, T) CLS-value similarity softmax and the (B, H, T, hd) value states."""
    attention = layer.self_attn
    residual = hidden
    x = layer.layer_norm1(hidden)
    batch, tokens, width = x.shape
    head_dim = width // heads

    def split(t):  # (B, T, E) -> (B, H, T, hd)
        return t.view(batch, tokens, heads, head_dim).transpose(1, 2)

    queries = split(attention.q_proj(x) * attention.scale)
    keys = split(attention.k_proj(x))
    values = split(attention.v_proj(x))
    kept_values = values.clone()
    flat_q = queries.reshape(batch * heads, tokens, head_dim)
    flat_k = keys.reshape(batch * heads, tokens, head_dim)
    flat_v = values.reshape(batch * heads, tokens, head_dim)
    weights = torch.softmax(torch.bmm(flat_q, flat_k.transpose(1, 2)), dim=-1)
    semantic = torch.softmax(torch.bmm(flat_v[:, :1], flat_v.transpose(1, 2)), dim=-1).view(batch, heads, tokens)
    out = torch.bmm(weights, flat_v).view(batch, heads, tokens, head_dim).transpose(1, 2).reshape(batch, tokens, width)
    hidden = residual + attention.out_proj(out)
    hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    return hidden, weights.view(batch, heads, tokens, tokens), semantic, kept_values


def reference_flowcut(tower, pixel_values, budget: int, feature_layer: int = -2):
    """The official FlowCut encoder loop on ``tower`` (a ``CLIPVisionModel`` or its ``vision_model``).

    ``budget``: patches handed to the LLM (official ``target = budget + 1``). Returns the (B, 1 + k, D) hidden states
    the model reads at ``feature_layer`` (its ``hidden_states[feature_layer]``), the (B, k) kept patch indices
    (ascending) and the list of the token counts left by each pruning layer.

    Layers past the feature layer are not scored (officially they never hold more than the target). When the
    feature layer is layer 0 the official loop never reaches ``rpl == 0`` (and would take the square root of a
    negative ``rpl`` at layer 1): there vtprune's documented extension is followed, layer 0 scores and the forced
    step cuts the feature layer's own patches."""
    vision = getattr(tower, "vision_model", tower)
    heads = vision.config.num_attention_heads
    layers = list(vision.encoder.layers)
    select_layer = len(layers) + feature_layer if feature_layer < 0 else feature_layer - 1
    target = budget + 1
    hidden = vision.pre_layrnorm(vision.embeddings(pixel_values))
    keep_index = torch.arange(hidden.shape[1]).unsqueeze(0).expand(hidden.shape[0], -1)
    running = None
    states = []
    left = []
    for idx, layer in enumerate(layers):
        rpl = select_layer - idx - 1
        states.append(hidden)
        hidden, weights, semantic, values = layer_with_signals(layer, hidden, heads)
        if hidden.shape[1] > target and idx < max(select_layer, 1):
            cls_attention = weights[:, :, 0, 1:].mean(dim=1)
            scores = official_score(cls_attention, semantic.mean(1)[:, 1:], values.mean(1)[:, 1:])
            running = scores.clone() if running is None else 0.5 * running + 0.5 * scores
            if not rpl % 2:
                prune = official_prune_count(cls_attention, rpl, target - 1) if rpl else hidden.shape[1]
                target_num = max(hidden.shape[1] - prune, target)
                chosen = torch.topk(running, target_num - 1, dim=1).indices.sort(dim=1).values
                patches = torch.gather(hidden[:, 1:], 1, chosen.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
                running = torch.gather(running, 1, chosen)
                keep_index = torch.gather(keep_index, 1, chosen)
                hidden = torch.cat([hidden[:, :1], patches], dim=1)
                left.append(hidden.shape[1])
    states.append(hidden)
    feature = states[feature_layer]
    if select_layer == 0 and feature.shape[1] > target:  # our extension: the feature layer's own patches cut
        chosen = torch.topk(running, target - 1, dim=1).indices.sort(dim=1).values
        patches = torch.gather(feature[:, 1:], 1, chosen.unsqueeze(-1).expand(-1, -1, feature.shape[-1]))
        feature = torch.cat([feature[:, :1], patches], dim=1)
        keep_index = torch.gather(keep_index, 1, chosen)
        left.append(feature.shape[1])
    return feature, keep_index, left


def reference_projected(model, pixel_values, budget: int, tower=None, batched: bool = False):
    """Per image: the (k, D) projector output of its kept patches and its (k,) kept patch indices; stacked to
    (images, k, D) / (images, k). Images one at a time (each has its own count), or with ``batched`` all images in
    one run of the official batched loop (the batch's shared count, ``r.max(0)``). ``tower``: the CLIP tower
    (default ``model.model.vision_tower``)."""
    tower = model.model.vision_tower if tower is None else tower
    if batched:
        with torch.no_grad():
            feature, index, _ = reference_flowcut(tower, pixel_values, budget)
            return model.model.multi_modal_projector(feature[:, 1:]), index
    projected, kept = [], []
    with torch.no_grad():
        for image in pixel_values:
            feature, index, _ = reference_flowcut(tower, image[None], budget)
            projected.append(model.model.multi_modal_projector(feature[:, 1:])[0])
            kept.append(index[0])
    return torch.stack(projected), torch.stack(kept)


def video_llava_image_inputs(model, images_per_sample=(1, 2), seed: int = 0, video: bool = False) -> dict:
    """Left-padded batch for the tiny Video-LLaVA: sample i holds ``images_per_sample[i]`` images of
    ``(image_size / patch) ** 2`` placeholders each; with ``video`` sample 0 also holds a 2-frame video."""
    vision = model.config.vision_config
    size = vision.image_size
    patches = (size // vision.patch_size) ** 2
    generator = torch.Generator().manual_seed(seed)
    rows, pixels = [], []
    for number, count in enumerate(images_per_sample):
        row = [BOS_ID] + torch.randint(3, 40, (3,), generator=generator).tolist()
        for image in range(count):
            pixels.append(torch.randn(3, size, size, generator=generator))
            row += [IMAGE_TOKEN_ID] * patches + [10 + image]
        if video and number == 0:
            row += [VIDEO_TOKEN_ID] * (2 * (patches + 1)) + [20]
        rows.append(row + torch.randint(3, 90, (4 + number,), generator=generator).tolist() + [41, 42])
    ids, mask = left_pad(rows)
    out = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.stack(pixels)}
    if video:
        out["pixel_values_videos"] = torch.randn(1, 2, 3, size, size, generator=generator)
    return out
