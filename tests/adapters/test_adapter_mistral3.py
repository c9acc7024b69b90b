"""Mistral 3 / Pixtral adapter (variable image sizes, [IMG_BREAK] / [IMG_END] row tokens) against independent
references, on a tiny random ``Mistral3ForConditionalGeneration`` (fp32)."""

from __future__ import annotations

import pytest
import torch

from adapter_fixtures import (
    PLACEMENT_RECIPES,
    NeedsCls,
    SignalRecorder,
    check_batch_equals_samples_alone,
    check_forward_and_generate,
    left_pad,
    sample_alone,
    single_thread,
)
from adapter_fixtures import forward_logits as _forward
from family_checks import check_keep_all_is_bit_identical, check_sdpa_equals_eager
from vtprune.adapters.mistral3 import Mistral3Adapter
from vtprune.framework import VtpruneError
from vtprune.framework.compose import compose
from vtprune.framework.prune import prune
from vtprune.testing import check_adapter

ATOL = 1e-5
VOCAB, IMAGE, BREAK, END, PAD, BOS = 96, 95, 93, 94, 0, 1
PATCH, MERGE = 7, 2
#: per sample, its images as (height, width) in pixels: 28x42 -> 2x3 merged tokens, 42x28 -> 3x2, 56x56 -> 4x4
IMAGES = (((28, 42),), ((56, 56), (42, 28)))
PLACEMENTS = list(PLACEMENT_RECIPES)

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def tiny_mistral3(attn: str = "sdpa", seed: int = 0):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    torch.manual_seed(seed)
    vision = PixtralVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=PATCH
    )
    text = MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=PAD, sliding_window=None,
    )
    config = Mistral3Config(vision_config=vision, text_config=text, image_token_index=IMAGE, spatial_merge_size=MERGE)
    config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    config.vision_config._attn_implementation = attn
    model = Mistral3ForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD
    return model


def image_tokens(height: int, width: int) -> list[int]:
    """The processor's placeholder text of one image: rows of [IMG] closed by [IMG_BREAK], the last by [IMG_END]."""
    rows, cols = height // (PATCH * MERGE), width // (PATCH * MERGE)
    out: list[int] = []
    for r in range(rows):
        out += [IMAGE] * cols + [END if r == rows - 1 else BREAK]
    return out


def mistral3_inputs(model, samples, images=IMAGES, seed: int = 0) -> dict:
    """Left-padded batch of the numbered samples (text, images, question), pixel values padded to the largest."""
    rows, sizes, pictures = [], [], []
    for s in samples:  # every sample draws from its own generator: a sample alone is the same sample
        gen = torch.Generator().manual_seed(1000 * seed + s)
        ids = [BOS] + torch.randint(3, 90, (2 + s,), generator=gen).tolist()
        for h, w in images[s]:
            ids += image_tokens(h, w) + torch.randint(3, 90, (1,), generator=gen).tolist()
            sizes.append((h, w))
            pictures.append(torch.randn(3, h, w, generator=gen))
        rows.append(ids + torch.randint(3, 90, (4 + 2 * s,), generator=gen).tolist())
    input_ids, mask = left_pad(rows, PAD)
    pixels = torch.zeros(len(sizes), 3, 56, 56)
    for n, (h, w) in enumerate(sizes):
        pixels[n, :, :h, :w] = pictures[n]
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": torch.tensor(sizes)}


@pytest.fixture(scope="module")
def model():
    return tiny_mistral3()


@pytest.fixture(scope="module")
def inputs(model):
    return mistral3_inputs(model, [0, 1])


def _alone(inputs, b):
    first = sum(len(IMAGES[s]) for s in range(b))
    return sample_alone(inputs, b, first, len(IMAGES[b]))


def test_rows_are_images_of_img_placeholders_only_with_their_grids(model, inputs):
    recorder = SignalRecorder(compose(PLACEMENT_RECIPES["pre_llm"]))
    with prune(model, recorder, budget=3) as handle:
        _forward(model, inputs)
    result = handle.last_selection
    assert result.num_tokens.tolist() == [6, 16, 6]
    assert result.image_sample.tolist() == [0, 1, 1]
    ids = inputs["input_ids"]
    for r, b in enumerate(result.image_sample.tolist()):
        assert bool((ids[b, result.image_positions[r]] == IMAGE).all())  # never a break / end token
    assert recorder.seen[0].grids.tolist() == [[2, 3], [4, 4], [3, 2]]
    # break / end tokens survive every drop
    index = result.sequence_index[result.sequence_mask]
    kept_ids = ids.gather(1, result.sequence_index)[result.sequence_mask]
    assert int((kept_ids == BREAK).sum()) == int((ids == BREAK).sum())
    assert int((kept_ids == END).sum()) == int((ids == END).sum()) and index.numel() > 0


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_keep_all_is_bit_identical_and_remove_restores_hooks(model, inputs, placement):
    check_keep_all_is_bit_identical(
        model, inputs, PLACEMENT_RECIPES[placement], _forward, all_counted=True, unpruned_after=True
    )


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_pruned_forward_and_generate_match_reference(model, inputs, placement, positions):
    kept_only = positions == "compact" and placement in ("pre_llm", "vision")
    result = check_forward_and_generate(model, inputs, PLACEMENT_RECIPES[placement], positions, kept_only, budget=4, atol=ATOL)
    assert bool((result.counts < result.num_tokens).all())


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("placement", ["pre_llm", "vision", "layer"])
def test_batch_equals_samples_alone(model, inputs, placement, positions):
    budgets = [3, 5, 2]
    alone = [(_alone(inputs, 0), [3]), (_alone(inputs, 1), [5, 2])]
    check_batch_equals_samples_alone(model, inputs, PLACEMENT_RECIPES[placement], positions, budgets, alone, atol=ATOL)


def test_vision_signals_are_merger_input_rows(model, inputs):
    recorder = SignalRecorder(compose(PLACEMENT_RECIPES["vision"]))
    with prune(model, recorder, budget=4):
        _forward(model, inputs)
    signals = recorder.seen[0]
    vlm = model.model
    with torch.no_grad():
        feats = vlm.vision_tower(inputs["pixel_values"], image_sizes=inputs["image_sizes"]).last_hidden_state
        normed = vlm.multi_modal_projector.norm(feats.squeeze(0))
    seen = {}
    handle = vlm.multi_modal_projector.patch_merger.merging_layer.register_forward_pre_hook(
        lambda m, a: seen.setdefault("rows", a[0])
    )
    with torch.no_grad():
        vlm.multi_modal_projector.patch_merger(normed, inputs["image_sizes"])
    handle.remove()
    rows = torch.split(seen["rows"], [6, 16, 6])
    assert signals.visual.shape == (3, 16, 32 * MERGE * MERGE)
    for r, row in enumerate(rows):
        torch.testing.assert_close(signals.visual[r, : row.shape[0]], row, atol=0, rtol=0)
        assert int(signals.visual_mask[r].sum()) == row.shape[0]
    with pytest.raises(VtpruneError, match="CLS|cls_attention"):
        prune(model, NeedsCls(compose(PLACEMENT_RECIPES["vision"]).placement), budget=4)


def test_sdpa_equals_eager():
    sdpa, eager = tiny_mistral3("sdpa"), tiny_mistral3("eager")
    batch = mistral3_inputs(sdpa, [0, 1])
    for placement in ("layer", "schedule", "pre_llm"):
        # real kept slots (fully masked rows differ)
        check_sdpa_equals_eager(sdpa, eager, batch, PLACEMENT_RECIPES[placement], 4, 1e-5, _forward)


def test_adapter_check_and_registration(model):
    from vtprune.framework.registry import default_registry

    assert default_registry().adapter_for(model) is Mistral3Adapter
    check_adapter(lambda: model, mistral3_inputs, samples=(0, 1))
    check_adapter(lambda: model, mistral3_inputs, "attention+critical+fps+layer(k=2)", samples=(0, 1))
