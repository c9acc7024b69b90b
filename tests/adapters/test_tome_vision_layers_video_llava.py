"""ToMe inside Video-LLaVA's CLIP image tower (placement ``vision_layers``), against the same independent reference as
LLaVA-1.5 (tests/adapters/test_tome_vision_layers.py: the official ToMe block written out with the image tower's
weights, the merged tokens in each image's first placeholder slots); a forward with a video raises."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from adapter_fixtures import BOS_ID, IMAGE_TOKEN_ID, generation_positions, left_pad, record_hooks, single_thread
from vtprune import framework
from vtprune.testing.models import tiny_clip_config, tiny_llama_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_tome_vision_layers import first_slots_reference, greedy, reference_features  # noqa: E402

REGISTRY = framework.build_registry(autoload=False)
VIDEO_TOKEN_ID = 94

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def tiny_video_llava_deep_tower(attn: str = "eager", seed: int = 0):
    """A random Video-LLaVA with 5-layer CLIP towers (feature layer -2: 4 merging layers, 16 patches per image)."""
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

    config = VideoLlavaConfig(
        vision_config=tiny_clip_config(num_hidden_layers=5),
        text_config=tiny_llama_config(num_hidden_layers=2),
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = VideoLlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn)
    model = model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def image_inputs(model, images_per_sample=(1, 2), seed=0, video=False):
    """Left-padded batch: sample i has ``images_per_sample[i]`` images (16 placeholders each), and with ``video`` a
    2-frame video after them in sample 0."""
    size = model.config.vision_config.image_size
    generator = torch.Generator().manual_seed(seed)
    rows, pixels = [], []
    for i, count in enumerate(images_per_sample):
        row = [BOS_ID] + torch.randint(3, 40, (3,), generator=generator).tolist()
        for j in range(count):
            pixels.append(torch.randn(3, size, size, generator=generator))
            row += [IMAGE_TOKEN_ID] * 16 + [10 + j]
        if video and i == 0:
            row += [VIDEO_TOKEN_ID] * (2 * 17) + [20]
        rows.append(row + torch.randint(3, 90, (4 + i,), generator=generator).tolist() + [41, 42])
    ids, mask = left_pad(rows)
    out = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.stack(pixels)}
    if video:
        out["pixel_values_videos"] = torch.randn(1, 2, 3, size, size, generator=generator)
    return out


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_tome_in_the_image_tower_equals_the_official_block(attn):
    model = tiny_video_llava_deep_tower(attn)
    inputs = image_inputs(model, seed=4)
    with torch.no_grad():
        model(**inputs, output_hidden_states=True)  # transformers installs its output-recording hooks once
    before = record_hooks(model)
    with framework.prune(model, "tome+placement.vision_layers(r=2)", budget=1, registry=REGISTRY) as handle, torch.no_grad():
        pruned = model(**inputs, position_ids=generation_positions(inputs["attention_mask"])).logits
        record = handle.last_selection.drops[0]
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        tower = model.model.get_image_features(inputs["pixel_values"]).pooler_output  # (images, 16, D)
    assert record_hooks(model) == before
    with torch.no_grad():
        projected, slots, sizes = reference_features(model, inputs["pixel_values"], [2, 2, 2, 2], tower=model.model.image_tower)
    torch.testing.assert_close(tower[:, :8], projected, atol=1e-5, rtol=1e-5)  # the merged tokens first, then zeros
    assert not bool(tower[:, 8:].any())
    assert record.where == "vision_layers" and projected.shape[1] == 8
    assert torch.equal(record.selection.assignment, slots) and torch.equal(record.selection.sizes, sizes.round().long())
    assert torch.equal(record.selection.sizes.sum(1), torch.full((3,), 16))
    ref_embeds, ref_mask, ref_pos = first_slots_reference(model, inputs, projected)
    with torch.no_grad():
        reference = model(inputs_embeds=ref_embeds, attention_mask=ref_mask, position_ids=ref_pos).logits
    torch.testing.assert_close(pruned[:, -1], reference[:, -1], atol=1e-5, rtol=1e-5)
    steps = generated[:, inputs["input_ids"].shape[1] :]
    assert torch.equal(steps, greedy(model, ref_embeds, ref_mask, ref_pos, 4))


def test_keep_all_batch_alone_and_videos_refused():
    model = tiny_video_llava_deep_tower("sdpa")
    inputs = image_inputs(model, (1, 1), seed=5)
    with torch.no_grad():
        plain = model(**inputs).logits
    with framework.prune(model, "tome", budget=16, registry=REGISTRY), torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain)  # a covering budget merges nothing: the unpruned model
    with framework.prune(model, "tome", budget=5, registry=REGISTRY) as handle, torch.no_grad():
        batch = model(**inputs).logits
        assert handle.last_selection.counts.tolist() == [5, 5]
        for b in range(2):
            real = inputs["attention_mask"][b].bool()
            single = {
                "input_ids": inputs["input_ids"][b : b + 1, real],
                "attention_mask": inputs["attention_mask"][b : b + 1, real],
                "pixel_values": inputs["pixel_values"][b : b + 1],
            }
            torch.testing.assert_close(batch[b, -1], model(**single).logits[0, -1], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="image tower only.*video"):
            model(**image_inputs(model, (1, 1), seed=5, video=True))
