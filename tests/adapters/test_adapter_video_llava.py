"""Video-LLaVA adapter (separate image and video towers, images and videos) against independent references."""

from __future__ import annotations

from typing import Sequence

import pytest
import torch

from adapter_fixtures import (
    BOS_ID,
    IMAGE_TOKEN_ID,
    PLACEMENT_RECIPES,
    check_batch_equals_samples_alone,
    check_forward_and_generate,
    generation_positions,
    left_pad,
    single_thread,
    tiny_video_llava,
)
from adapter_fixtures import forward_logits as _forward
from family_checks import check_keep_all_is_bit_identical, check_remove_restores, check_rows_are_items, check_sdpa_equals_eager
from vtprune.framework.prune import adapter_for, prune
from vtprune.testing import check_adapter

ATOL = 1e-5
VIDEO_TOKEN_ID = 94
RECIPES = PLACEMENT_RECIPES
PLACEMENTS = list(RECIPES)
#: sample 0: a video then an image; sample 1: two images then a video
SPEC = ((("video",), ("image",)), (("image",), ("image",), ("video",)))

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def video_llava_inputs(model, samples: Sequence[int] = (0, 1), frames: int = 2, seed: int = 0):
    """Left-padded batch of the samples ``SPEC[i]`` (each built from its own seed, so a sample alone equals its
    batch row); placeholder counts from the model's own get_image_features / get_video_features."""
    size = model.config.vision_config.image_size
    with torch.no_grad():
        image_count = int(model.model.get_image_features(torch.zeros(1, 3, size, size)).pooler_output.shape[1])
        encoded = model.model.get_video_features(torch.zeros(1, frames, 3, size, size)).pooler_output  # (frames, n, D)
    video_count = frames * int(encoded.shape[1])
    rows, images, videos = [], [], []
    for i in samples:
        generator = torch.Generator().manual_seed(seed * 100 + i)
        row = [BOS_ID] + torch.randint(3, 40, (3,), generator=generator).tolist()
        for j, item in enumerate(SPEC[i]):
            if item[0] == "image":
                images.append(torch.randn(3, size, size, generator=generator))
                row += [IMAGE_TOKEN_ID] * image_count
            else:
                videos.append(torch.randn(frames, 3, size, size, generator=generator))
                row += [VIDEO_TOKEN_ID] * video_count
            row += [10 + j]
        row += torch.randint(3, 90, (4 + 2 * i,), generator=generator).tolist() + [41, 42]
        rows.append(row)
    ids, mask = left_pad(rows)
    out = {"input_ids": ids, "attention_mask": mask}
    if images:
        out["pixel_values"] = torch.stack(images)
    if videos:
        out["pixel_values_videos"] = torch.stack(videos)
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_video_llava()


@pytest.fixture(scope="module")
def inputs(model):
    return video_llava_inputs(model)


def test_resolves_to_its_adapter_and_one_row_per_image_and_video(model, inputs):
    assert adapter_for(model).name == "video_llava"
    with prune(model, RECIPES["pre_llm"], budget=0.25) as handle:
        _forward(model, inputs)
    kinds = [item[0] for sample in SPEC for item in sample]
    token = {"image": IMAGE_TOKEN_ID, "video": VIDEO_TOKEN_ID}
    counts = check_rows_are_items(handle.last_selection, inputs["input_ids"], kinds, [0, 0, 1, 1, 1], token, ratio=0.25)
    assert counts[1] == 16 and counts[0] == 2 * 17  # image: 4x4 patches; video: 2 frames of CLS + 16 patches


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_keep_all_is_bit_identical_and_remove_restores(model, inputs, placement):
    check_keep_all_is_bit_identical(model, inputs, RECIPES[placement], _forward)
    check_remove_restores(model, inputs, RECIPES[placement], 5, _forward)


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_pruned_forward_and_generate_match_reference(model, inputs, placement, positions):
    kept_only = positions == "compact" and placement in ("pre_llm", "vision")
    check_forward_and_generate(model, inputs, RECIPES[placement], positions, kept_only, atol=ATOL)


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("placement", ["pre_llm", "layer", "vision"])
def test_batch_equals_samples_alone(model, inputs, placement, positions):
    budgets = [5, 9, 3, 7, 4]
    alone = [(video_llava_inputs(model, [0]), budgets[:2]), (video_llava_inputs(model, [1]), budgets[2:])]
    check_batch_equals_samples_alone(model, inputs, RECIPES[placement], positions, budgets, alone, atol=ATOL)


def test_vision_signals_are_the_projector_inputs_of_both_towers(model, inputs):
    from adapter_fixtures import SignalRecorder
    from vtprune.framework.compose import compose

    recorder = SignalRecorder(compose(RECIPES["vision"]))
    with prune(model, recorder, budget=4):
        _forward(model, inputs)
    signals = recorder.seen[-1]
    vlm = model.model
    with torch.no_grad():
        image = vlm.image_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        frames = inputs["pixel_values_videos"].flatten(0, 1)
        video = vlm.video_tower(frames, output_hidden_states=True).hidden_states[-2]  # (videos*frames, 17, Dv)
    video = video.reshape(2, -1, video.shape[-1])
    want = [video[0], image[0], image[1], image[2], video[1]]
    for r, row in enumerate(want):
        torch.testing.assert_close(signals.visual[r, : row.shape[0]], row, atol=1e-6, rtol=0)
    assert signals.grids.tolist() == [[0, 0], [4, 4], [4, 4], [4, 4], [0, 0]]


@pytest.mark.parametrize("placement", ["pre_llm", "layer", "vision"])
def test_sdpa_equals_eager(model, inputs, placement):
    feed = {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}
    check_sdpa_equals_eager(model, tiny_video_llava(attn="eager"), feed, RECIPES[placement], 6, ATOL, _forward)


@pytest.mark.parametrize("recipe", [RECIPES["layer"], "random+critical+fps+vision"])
def test_check_adapter(recipe):
    check_adapter(
        tiny_video_llava,
        video_llava_inputs,
        recipe=recipe,
        budgets=(3, 0.5),
    )


def test_cls_attention_is_a_declared_limitation(model):
    from vtprune.framework import MissingSignalError

    with pytest.raises(MissingSignalError, match="CLS"):
        prune(model, "cls_attention+critical+fps+pre_llm", budget=4)


def test_video_rows_carry_their_frames(model, inputs):
    """A video row is (frames, side, side) patch tokens, each frame's CLS token (its first) at frame_index -1; frame
    t's tokens = the model's own get_video_features patch rows of frame t; image rows (0, 0, 0); batch == alone."""
    from frame_checks import FRAME_RECIPES, Row, check_frames, check_frames_batch_equals_alone, placeholder_items

    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    videos = inputs["pixel_values_videos"]
    frames = int(videos.shape[1])
    with torch.no_grad():
        features = model.model.get_video_features(
            videos, vision_feature_layer=model.config.vision_feature_layer, output_hidden_states=True
        ).pooler_output  # (videos * frames, 1 + side * side, D)
    per_video = list(features.reshape(videos.shape[0], frames, 1 + side * side, -1))
    rows = []
    for kind, length in placeholder_items(inputs["input_ids"], IMAGE_TOKEN_ID, VIDEO_TOKEN_ID):
        if kind == "image":
            rows.append(Row(length))
        else:
            assert length == frames * (1 + side * side)
            cls_tokens = tuple(t * (1 + side * side) for t in range(frames))
            rows.append(Row(length, (frames, side, side), cls_tokens, per_video.pop(0)[:, 1:]))
    check_frames(model, inputs, rows, _forward, {**FRAME_RECIPES, "vision": RECIPES["vision"]})
    check_frames_batch_equals_alone(model, inputs, [video_llava_inputs(model, [b]) for b in range(len(SPEC))], _forward)
