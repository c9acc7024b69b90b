"""InternVL adapter (tiles, pixel-shuffle projector) against independent references on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from adapter_fixtures import (
    BOS_ID,
    IMAGE_TOKEN_ID,
    PAD_ID,
    PLACEMENT_RECIPES,
    check_batch_equals_samples_alone,
    check_forward_and_generate,
    forward_logits,
    left_pad,
    single_thread,
)
from family_checks import check_keep_all_is_bit_identical, check_remove_restores, check_sdpa_equals_eager
from vtprune.framework.prune import prune
from vtprune.testing import check_adapter

ATOL = 1e-5
RECIPES = PLACEMENT_RECIPES
PLACEMENTS = list(RECIPES)
IMG_START, IMG_END = 80, 81  # "<img>" / "</img>" text markers
TILES = ((2,), (1, 3))  # sample 0: one image of 2 tiles; sample 1: a one-tile image and a 3-tile image
ALL_SAMPLES = TILES + ((1, 1),)  # sample 2 (check_adapter): two one-tile images

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def tiny_internvl(attn: str = "sdpa", seed: int = 0):
    """Random ``InternVLForConditionalGeneration``: 56 px tiles of 8x8 patches -> 4x4 = 16 tokens per tile,
    Qwen2 decoder of 4 layers (GQA 4/2)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=7
        ),
        text_config=Qwen2Config(
            vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=2,
        ),
        image_token_id=IMAGE_TOKEN_ID,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    model.set_attn_implementation(attn)
    model = model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_ID
    return model


def internvl_inputs(model, samples=(0, 1), seed: int = 0) -> dict:
    """Left-padded batch of the numbered samples (``ALL_SAMPLES[i]`` = tiles per image); each image is
    ``<img>`` + 16 placeholders per tile + ``</img>``; tile pixels depend on (sample, image, tile) only."""
    size = model.config.vision_config.image_size[0]
    rows, pixels = [], []
    for i in samples:
        gen = torch.Generator().manual_seed(seed + 100 * i)
        row = [BOS_ID] + torch.randint(3, 40, (3,), generator=gen).tolist()
        for tiles in ALL_SAMPLES[i]:
            row += [IMG_START] + [IMAGE_TOKEN_ID] * (16 * tiles) + [IMG_END]
            pixels.append(torch.randn(tiles, 3, size, size, generator=gen))
        row += torch.randint(3, 79, (3 + i,), generator=gen).tolist() + [41, 42]
        rows.append(row)
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(pixels)}


@pytest.fixture(scope="module")
def model():
    return tiny_internvl()


@pytest.fixture(scope="module")
def inputs(model):
    return internvl_inputs(model)


def test_one_row_per_image_over_all_its_tiles(model, inputs):
    with prune(model, RECIPES["pre_llm"], budget=0.25) as handle:
        forward_logits(model, inputs)
    result = handle.last_selection
    assert result.num_tokens.tolist() == [32, 16, 48]
    assert result.image_sample.tolist() == [0, 1, 1]
    assert result.counts.tolist() == [8, 4, 12]
    ids = inputs["input_ids"]
    for positions, sample in zip(result.image_positions, result.image_sample.tolist()):
        assert bool((ids[sample, positions] == IMAGE_TOKEN_ID).all())  # markers are never visual tokens


def test_vision_signals_are_projector_inputs_with_grids(model, inputs):
    seen = []

    class Spy:
        requires = frozenset({"visual"})

        class placement:  # noqa: N801 - duck-typed placement
            name = "vision"

            @staticmethod
            def drops(budget):
                from vtprune.framework.stages import Drop

                return (Drop("vision", None, budget),)

        def select(self, signals, budget):
            from vtprune.framework.selection import selection_from_masks

            seen.append(signals)
            return selection_from_masks(signals.valid(), signals.valid())

    with torch.no_grad():
        vision = model.model.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 1:]  # (T, 64, Dv)
        shuffled = model.model.pixel_shuffle(vision.reshape(vision.shape[0], 8, 8, -1)).reshape(vision.shape[0], 16, -1)
    with prune(model, Spy(), budget=10_000):
        forward_logits(model, inputs)
    signals = seen[-1]
    flat = shuffled.reshape(-1, shuffled.shape[-1])
    for row, (start, count) in enumerate(((0, 32), (32, 16), (48, 48))):
        torch.testing.assert_close(signals.visual[row, :count], flat[start : start + count], atol=1e-6, rtol=0)
    assert signals.grids.tolist() == [[0, 0], [4, 4], [0, 0]]  # only the one-tile image is one grid


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_keep_all_is_bit_identical(model, inputs, placement):
    check_keep_all_is_bit_identical(model, inputs, RECIPES[placement])


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_pruned_forward_and_generate_match_reference(model, inputs, placement, positions):
    kept_only = positions == "compact" and placement in ("pre_llm", "vision")
    check_forward_and_generate(model, inputs, RECIPES[placement], positions, kept_only, atol=ATOL)


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("placement", ["pre_llm", "layer", "vision"])
def test_batch_equals_samples_alone(model, inputs, placement, positions):
    budgets = [5, 9, 3]
    alone = [(internvl_inputs(model, (0,)), budgets[:1]), (internvl_inputs(model, (1,)), budgets[1:])]
    check_batch_equals_samples_alone(model, inputs, RECIPES[placement], positions, budgets, alone, atol=ATOL)


@pytest.mark.parametrize("placement", ["pre_llm", "layer"])
def test_sdpa_equals_eager(model, inputs, placement):
    check_sdpa_equals_eager(model, tiny_internvl(attn="eager"), inputs, RECIPES[placement], 6, ATOL)  # pad slots are garbage


def test_remove_restores_bit_identical(model, inputs):
    check_remove_restores(model, inputs, RECIPES["schedule"], 6)


def test_check_adapter():
    check_adapter(tiny_internvl, internvl_inputs, samples=(0, 1, 2))


def test_cls_attention_is_a_declared_limitation(model):
    with pytest.raises(Exception, match="pixel shuffle"):
        prune(model, "visionzip+vision", budget=6)
