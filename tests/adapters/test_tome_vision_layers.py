"""ToMe inside the CLIP tower (placement ``vision_layers``) on a tiny LLaVA, against an independent reference: the
official ToMe block (tome/patch/timm.py ``ToMeBlock`` / ``ToMeAttention`` @ af95e4b1) written out here with the tower's
own weights (merge between attention and MLP, keys averaged over heads, class token protected, ``log(size)`` added
to the logits), then the LLM fed the merged tokens in the image's first placeholder slots and nothing else."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from adapter_fixtures import PAD_ID, generation_positions, llava_inputs, record_hooks, single_thread
from vtprune import framework
from vtprune.testing.models import finish_tiny, tiny_clip_config, tiny_llama_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "strategies"))
from test_tome import official_matching, official_source, official_wavg  # noqa: E402

REGISTRY = framework.build_registry(autoload=False)

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def tiny_llava_deep_tower(attn: str = "eager", seed: int = 0):
    """The tiny LLaVA with a 5-layer CLIP tower (feature layer -2: 4 merging layers)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=tiny_clip_config(num_hidden_layers=5),
        text_config=tiny_llama_config(num_hidden_layers=2),
        image_token_id=95,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    return finish_tiny(LlavaForConditionalGeneration(config), attn, PAD_ID, torch.float32)


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
    positions = generation_positions(mask)
    rows_keep = [(~drop[b]).nonzero().flatten() for b in range(ids.shape[0])]
    width = max(r.numel() for r in rows_keep)
    ref_embeds = torch.zeros(ids.shape[0], width, embeds.shape[-1])
    ref_mask = torch.zeros(ids.shape[0], width, dtype=torch.long)
    ref_pos = torch.zeros(ids.shape[0], width, dtype=torch.long)
    for b, keep in enumerate(rows_keep):
        ref_embeds[b, width - keep.numel() :] = embeds[b, keep]
        ref_mask[b, width - keep.numel() :] = mask[b, keep]
        ref_pos[b, width - keep.numel() :] = positions[b, keep]
    return ref_embeds, ref_mask, ref_pos


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


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_tome_in_tower_equals_the_official_block(attn):
    model = tiny_llava_deep_tower(attn)
    inputs = llava_inputs(model, (1, 2), (5, 3), seed=4)
    schedule = [2, 2, 2, 2]  # official constant r: 17 -> 9 tokens (8 patches) over the 4 merging layers
    with torch.no_grad():
        model(**inputs, output_hidden_states=True)  # transformers installs its output-recording hooks once
    before = record_hooks(model)
    with framework.prune(model, "tome+placement.vision_layers(r=2)", budget=1, registry=REGISTRY) as handle, torch.no_grad():
        pruned = model(**inputs, position_ids=generation_positions(inputs["attention_mask"])).logits
        result = handle.last_selection
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert record_hooks(model) == before
    with torch.no_grad():
        projected, slots, sizes = reference_features(model, inputs["pixel_values"], schedule)
    kept = projected.shape[1]
    record = result.drops[0]
    assert record.where == "vision_layers" and kept == 8
    assert torch.equal(record.selection.assignment, slots) and torch.equal(record.selection.sizes, sizes.round().long())
    assert torch.equal(record.selection.sizes.sum(1), torch.full((3,), 16))
    ref_embeds, ref_mask, ref_pos = first_slots_reference(model, inputs, projected)
    with torch.no_grad():
        reference = model(inputs_embeds=ref_embeds, attention_mask=ref_mask, position_ids=ref_pos).logits
    torch.testing.assert_close(pruned[:, -1], reference[:, -1], atol=1e-5, rtol=1e-5)
    steps = generated[:, inputs["input_ids"].shape[1] :]
    assert torch.equal(steps, greedy(model, ref_embeds, ref_mask, ref_pos, 4))  # generate == greedy on the reference


def test_budget_derives_r_and_batch_equals_alone():
    model = tiny_llava_deep_tower("sdpa")
    inputs = llava_inputs(model, (1, 1), (5, 3), seed=5)
    with framework.prune(model, "tome", budget=5, registry=REGISTRY) as handle, torch.no_grad():
        batch = model(**inputs).logits
        counts = handle.last_selection.counts
        alone = []
        for b in range(2):
            real = inputs["attention_mask"][b].bool()
            single = {
                "input_ids": inputs["input_ids"][b : b + 1, real],
                "attention_mask": inputs["attention_mask"][b : b + 1, real],
                "pixel_values": inputs["pixel_values"][b : b + 1],
            }
            alone.append(model(**single).logits)
    assert counts.tolist() == [5, 5]  # r derived from the budget: exactly the budget remains
    for b in range(2):
        torch.testing.assert_close(batch[b, -1], alone[b][0, -1], atol=1e-5, rtol=1e-5)


def test_vision_layers_needs_the_tome_stage_and_a_clip_adapter():
    model = tiny_llava_deep_tower("sdpa")
    with pytest.raises(ValueError, match="diversity.tome"):
        framework.prune(model, "relevance.none+diversity.fps+placement.vision_layers", budget=4, registry=REGISTRY)
