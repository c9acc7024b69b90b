"""ToMe inside Video-LLaVA's CLIP image tower (placement ``vision_layers``), against the same independent reference as
LLaVA-1.5 (tests/helpers/tome_tower_reference.py: the official ToMe block written out with the image tower's
weights, the merged tokens in each image's first placeholder slots); a forward with a video raises."""

from __future__ import annotations

import pytest
import torch

from adapter_fixtures import BOS_ID, IMAGE_TOKEN_ID, left_pad, sample_alone, single_thread
from tome_tower_reference import check_first_slots_reference, reference_features, run_tome_in_tower, tiny_video_llava_deep_tower
from vtprune import framework

REGISTRY = framework.build_registry(autoload=False)
VIDEO_TOKEN_ID = 94

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


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
    image_features = lambda: model.model.get_image_features(inputs["pixel_values"]).pooler_output  # noqa: E731
    pruned, result, generated, tower = run_tome_in_tower(model, inputs, REGISTRY, image_features)  # tower: (images, 16, D)
    record = result.drops[0]
    with torch.no_grad():
        projected, slots, sizes = reference_features(model, inputs["pixel_values"], [2, 2, 2, 2], tower=model.model.image_tower)
    torch.testing.assert_close(tower[:, :8], projected, atol=1e-5, rtol=1e-5)  # the merged tokens first, then zeros
    assert not bool(tower[:, 8:].any())
    assert record.where == "vision_layers" and projected.shape[1] == 8
    assert torch.equal(record.selection.assignment, slots) and torch.equal(record.selection.sizes, sizes.round().long())
    assert torch.equal(record.selection.sizes.sum(1), torch.full((3,), 16))
    check_first_slots_reference(model, inputs, projected, pruned, generated, steps=4)


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
            single = sample_alone(inputs, b, b, 1)
            torch.testing.assert_close(batch[b, -1], model(**single).logits[0, -1], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="image tower only.*video"):
            model(**image_inputs(model, (1, 1), seed=5, video=True))
