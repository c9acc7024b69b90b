"""LLaVA-NeXT-Video adapter (AnyRes images with newline tokens + pooled video frames) against independent references."""

from __future__ import annotations

from typing import Sequence

import pytest
import torch

from adapter_fixtures import (
    BOS_ID,
    IMAGE_SIZE,
    IMAGE_TOKEN_ID,
    PLACEMENT_RECIPES,
    check_batch_equals_samples_alone,
    check_forward_and_generate,
    generation_positions,
    left_pad,
    single_thread,
    tiny_clip_config,
    tiny_llama_config,
)
from adapter_fixtures import forward_logits as _forward
from family_checks import check_keep_all_is_bit_identical, check_remove_restores, check_rows_are_items, check_sdpa_equals_eager
from vtprune.framework import MissingSignalError, VtpruneError
from vtprune.framework.prune import adapter_for, prune
from vtprune.testing import check_adapter

ATOL = 1e-5
VIDEO_TOKEN_ID = 94
RECIPES = {name: recipe for name, recipe in PLACEMENT_RECIPES.items() if name != "vision"}
PLACEMENTS = list(RECIPES)
#: sample 0: a wide image then a video; sample 1: a video, a tall image and a small one (AnyRes: different sizes)
SPEC = ((("image", (30, 50)), ("video",)), (("video",), ("image", (56, 28)), ("image", (28, 28))))

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def tiny_llava_next_video(attn: str = "sdpa", seed: int = 0, layers: int = 4):
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    config = LlavaNextVideoConfig(
        vision_config=tiny_clip_config(),
        text_config=tiny_llama_config(num_hidden_layers=layers),
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE], [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]],
        spatial_pool_stride=2,
    )
    torch.manual_seed(seed)
    model = LlavaNextVideoForConditionalGeneration(config)
    model.set_attn_implementation(attn)
    model = model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def llava_next_video_inputs(model, samples: Sequence[int] = (0, 1), frames: int = 2, seed: int = 0):
    """Left-padded batch of the samples ``SPEC[i]`` (each from its own seed: a sample alone equals its batch row);
    placeholder counts from the model's own get_image_features / get_video_features."""
    from transformers.models.llava_next_video.modeling_llava_next_video import image_size_to_num_patches

    config = model.config
    size = config.vision_config.image_size
    rows, images, sizes, videos = [], [], [], []
    for i in samples:
        generator = torch.Generator().manual_seed(seed * 100 + i)
        row = [BOS_ID] + torch.randint(3, 40, (3,), generator=generator).tolist()
        for j, item in enumerate(SPEC[i]):
            if item[0] == "image":
                crops = image_size_to_num_patches(list(item[1]), config.image_grid_pinpoints, size)
                images.append(torch.randn(crops, 3, size, size, generator=generator))
                sizes.append(list(item[1]))
                with torch.no_grad():
                    packed = model.model.get_image_features(images[-1][None], torch.tensor([item[1]])).pooler_output
                row += [IMAGE_TOKEN_ID] * int(packed[0].shape[0])
            else:
                videos.append(torch.randn(frames, 3, size, size, generator=generator))
                with torch.no_grad():
                    encoded = model.model.get_video_features(videos[-1][None]).pooler_output  # (1, frames*pooled, D)
                row += [VIDEO_TOKEN_ID] * int(encoded.shape[1])
            row += [10 + j]
        row += torch.randint(3, 90, (4 + 2 * i,), generator=generator).tolist() + [41, 42]
        rows.append(row)
    ids, mask = left_pad(rows)
    out = {"input_ids": ids, "attention_mask": mask}
    if images:
        pixel_values = torch.zeros(len(images), max(p.shape[0] for p in images), 3, size, size)
        for k, p in enumerate(images):
            pixel_values[k, : p.shape[0]] = p
        out["pixel_values"] = pixel_values
        out["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
    if videos:
        out["pixel_values_videos"] = torch.stack(videos)
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_llava_next_video()


@pytest.fixture(scope="module")
def inputs(model):
    return llava_next_video_inputs(model)


def test_one_row_per_image_and_video_in_sequence_order(model, inputs):
    assert adapter_for(model).name == "llava_next_video"
    with prune(model, RECIPES["pre_llm"], budget=0.25) as handle:
        _forward(model, inputs)
    kinds = [item[0] for sample in SPEC for item in sample]
    token = {"image": IMAGE_TOKEN_ID, "video": VIDEO_TOKEN_ID}
    counts = check_rows_are_items(
        handle.last_selection, inputs["input_ids"], kinds, [0, 0, 1, 1, 1], token, contiguous=True, ratio=0.25
    )
    assert counts[1] == counts[2] == 2 * 4  # 2 frames of 4x4 patches pooled to 2x2
    assert len({counts[0], counts[3], counts[4]}) == 3  # AnyRes: three image sizes, three token counts


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_keep_all_is_bit_identical_and_remove_restores(model, inputs, placement):
    check_keep_all_is_bit_identical(model, inputs, RECIPES[placement], _forward)
    check_remove_restores(model, inputs, RECIPES[placement], 5, _forward)


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_pruned_forward_and_generate_match_reference(model, inputs, placement, positions):
    kept_only = positions == "compact" and placement == "pre_llm"
    check_forward_and_generate(model, inputs, RECIPES[placement], positions, kept_only, atol=ATOL)


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("placement", ["pre_llm", "layer"])
def test_batch_equals_samples_alone(model, inputs, placement, positions):
    budgets = [5, 3, 7, 9, 4]
    alone = [(llava_next_video_inputs(model, [0]), budgets[:2]), (llava_next_video_inputs(model, [1]), budgets[2:])]
    check_batch_equals_samples_alone(model, inputs, RECIPES[placement], positions, budgets, alone, atol=ATOL)


@pytest.mark.parametrize("placement", ["pre_llm", "layer"])
def test_sdpa_equals_eager(model, inputs, placement):
    feed = {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}
    check_sdpa_equals_eager(model, tiny_llava_next_video(attn="eager"), feed, RECIPES[placement], 6, ATOL, _forward)


def test_newline_tokens_are_in_images_only(model, inputs):
    """Image rows carry LLaVA-NeXT's image-newline tokens (exact copies of model.image_newline); video rows none."""
    from adapter_fixtures import merged_embeddings
    from vtprune.adapters.call import ForwardCall
    from vtprune.adapters.llava_next_video import LlavaNextVideoAdapter

    adapter = LlavaNextVideoAdapter(model)
    ids = inputs["input_ids"]
    kind_ids = torch.where(torch.isin(ids, torch.tensor([IMAGE_TOKEN_ID, VIDEO_TOKEN_ID])), ids, -1)  # (B, L)
    call = ForwardCall(ids, kind_ids >= 0, True, dict(inputs), kind_ids=kind_ids)
    counts = adapter.image_counts(call, int((kind_ids >= 0).sum()))
    with torch.no_grad():
        embeds = merged_embeddings(model, inputs)  # (B, L, D)
    rows = list(torch.split(embeds[kind_ids >= 0], counts))
    layouts = adapter.layouts(call, counts, rows)
    assert [layout.kind for layout in layouts] == [item[0] for sample in SPEC for item in sample]
    for layout, row in zip(layouts, rows):
        assert (layout.newline is not None) == (layout.kind == "image")
        if layout.newline is not None:
            assert torch.all(row[layout.newline] == model.model.image_newline)


def test_check_adapter():
    check_adapter(tiny_llava_next_video, llava_next_video_inputs, recipe=RECIPES["layer"], budgets=(3, 0.5))


def test_vision_and_cls_attention_are_declared_limitations(model):
    with pytest.raises(VtpruneError, match="vision"):
        prune(model, "random+critical+fps+vision", budget=4)
    with pytest.raises(MissingSignalError, match="cls_attention"):
        prune(model, "cls_attention+critical+fps+pre_llm", budget=4)


def test_video_rows_carry_their_frames(model, inputs):
    """A video row is (frames, side / stride, side / stride) resampled tokens, frame t's tokens = the model's own
    get_video_features rows of frame t; image rows (0, 0, 0); batch == alone."""
    from frame_checks import Row, check_frames, check_frames_batch_equals_alone, placeholder_items

    vision = model.config.vision_config
    side = (vision.image_size // vision.patch_size) // model.config.spatial_pool_stride
    frames = int(inputs["pixel_values_videos"].shape[1])
    with torch.no_grad():
        videos = list(model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output)  # (T*s*s, D)
    rows = []
    for kind, length in placeholder_items(inputs["input_ids"], IMAGE_TOKEN_ID, VIDEO_TOKEN_ID):
        if kind == "image":
            rows.append(Row(length))
        else:
            assert length == frames * side * side
            rows.append(Row(length, (frames, side, side), (), videos.pop(0).reshape(frames, side * side, -1)))
    check_frames(model, inputs, rows, _forward)
    alone = [llava_next_video_inputs(model, samples=(b,)) for b in range(len(SPEC))]
    check_frames_batch_equals_alone(model, inputs, alone, _forward)
