"""Idefics3 and SmolVLM adapters (image splitting into sub-images with row / column markers) against independent
references on tiny random models."""

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
FAKE, GLOBAL, NEWLINE, FIRST_ROW_COL = 80, 85, 10, 81  # <fake_token_around_image>, <global-img>, "\n", <row_1_col_1>
SPLITS = (((1, 2),), ((0, 0), (2, 1)))  # per sample, per image (rows, cols) of crops; (0, 0) = not split
ALL_SAMPLES = SPLITS + (((0, 0), (0, 0)),)  # sample 2 (check_adapter): two unsplit images
FAMILIES = ("idefics3", "smolvlm")

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def tiny_model(family: str = "idefics3", attn: str = "sdpa", seed: int = 0):
    """Random ``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration``: 56 px sub-images of 8x8
    patches -> 4x4 = 16 tokens each (scale_factor 2), Llama decoder of 4 layers (GQA 4/2)."""
    import transformers
    from transformers import LlamaConfig

    prefix = "Idefics3" if family == "idefics3" else "SmolVLM"
    vision = getattr(transformers, f"{prefix}VisionConfig")(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=7
    )
    text = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=2,
    )
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, scale_factor=2
    )
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
    model.set_attn_implementation(attn)
    model = model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_ID
    return model


def _image_tokens(rows: int, cols: int) -> list[int]:
    """The processor's text for one image: crops row by row with their markers, then the global view."""
    out: list[int] = []
    for r in range(rows):
        for c in range(cols):
            out += [FAKE, FIRST_ROW_COL + r * cols + c] + [IMAGE_TOKEN_ID] * 16
        out += [NEWLINE]
    if rows:
        out += [NEWLINE]
    return out + [FAKE, GLOBAL] + [IMAGE_TOKEN_ID] * 16 + [FAKE]


def idefics3_inputs(model, samples=(0, 1), seed: int = 0) -> dict:
    """Left-padded batch of the numbered samples; ``pixel_values`` (B, max sub-images, 3, 56, 56) zero padded (as
    the processor pads); sub-image pixels depend on the sample only."""
    rows, pixels = [], []
    for i in samples:
        gen = torch.Generator().manual_seed(seed + 100 * i)
        row = [BOS_ID] + torch.randint(3, 40, (3,), generator=gen).tolist()
        count = 0
        for rows_, cols in ALL_SAMPLES[i]:
            row += _image_tokens(rows_, cols) + torch.randint(3, 79, (1,), generator=gen).tolist()
            count += rows_ * cols + 1
        row += torch.randint(3, 79, (3 + i,), generator=gen).tolist() + [41, 42]
        rows.append(row)
        pixels.append(torch.randn(count, 3, 56, 56, generator=gen))
    ids, mask = left_pad(rows)
    values = torch.zeros(len(pixels), max(p.shape[0] for p in pixels), 3, 56, 56)
    for b, p in enumerate(pixels):
        values[b, : p.shape[0]] = p
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": values}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return tiny_model(family)


@pytest.fixture(scope="module")
def inputs(model):
    return idefics3_inputs(model)


def test_one_row_per_sub_image_markers_are_text(model, inputs, family):
    from vtprune.framework.prune import adapter_for

    assert adapter_for(model).name == family
    with prune(model, RECIPES["pre_llm"], budget=0.25) as handle:
        forward_logits(model, inputs)
    result = handle.last_selection
    assert result.num_tokens.tolist() == [16] * 7
    assert result.image_sample.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert result.counts.tolist() == [4] * 7
    ids = inputs["input_ids"]
    for positions, sample in zip(result.image_positions, result.image_sample.tolist()):
        assert bool((ids[sample, positions] == IMAGE_TOKEN_ID).all())  # markers / newlines are never visual tokens


def test_vision_signals_are_shuffled_features_with_grid(model, inputs):
    seen = []

    class Spy:
        requires = frozenset({"visual", "grid"})

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

    real = inputs["pixel_values"].flatten(0, 1)
    real = real[(real != 0).flatten(1).any(1)]  # (7, 3, 56, 56) the sub-images, in order
    with torch.no_grad():
        hidden = model.model.vision_model(pixel_values=real).last_hidden_state  # (7, 64, Dv)
        shuffled = model.model.connector.pixel_shuffle(hidden, 2)  # (7, 16, 4 Dv)
    with prune(model, Spy(), budget=10_000):
        forward_logits(model, inputs)
    signals = seen[-1]
    torch.testing.assert_close(signals.visual, shuffled, atol=1e-6, rtol=0)
    assert signals.grid == (4, 4)


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
    budgets = [5, 9, 3, 6, 4, 7, 8]
    alone = [(idefics3_inputs(model, (0,)), budgets[:3]), (idefics3_inputs(model, (1,)), budgets[3:])]
    check_batch_equals_samples_alone(model, inputs, RECIPES[placement], positions, budgets, alone, atol=ATOL)


@pytest.mark.parametrize("placement", ["pre_llm", "layer"])
def test_sdpa_equals_eager(model, inputs, family, placement):
    check_sdpa_equals_eager(model, tiny_model(family, attn="eager"), inputs, RECIPES[placement], 6, ATOL)  # pad slots are garbage


def test_remove_restores_bit_identical(model, inputs):
    check_remove_restores(model, inputs, RECIPES["schedule"], 6)


def test_check_adapter(family):
    check_adapter(lambda: tiny_model(family), idefics3_inputs, samples=(0, 1, 2))


def test_cls_attention_is_a_declared_limitation(model):
    with pytest.raises(Exception, match="no CLS token"):
        prune(model, "visionzip+vision", budget=6)
