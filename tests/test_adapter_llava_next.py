"""LLaVA-NeXT adapter (AnyRes crops + image-newline tokens) against independent references."""

from __future__ import annotations

import pytest
import torch

from adapter_fixtures import (
    PLACEMENT_RECIPES,
    aligned,
    generation_positions,
    kept_only_inputs,
    llava_next_inputs,
    masked_reference,
    removed_by_layer,
    single_thread,
    tiny_llava_next,
)
from vtprune.framework.prune import prune

ATOL = 1e-5
RECIPES = PLACEMENT_RECIPES
PLACEMENTS = list(RECIPES)
SIZES = (((30, 50),), ((50, 30), (28, 28)))  # sample 0: one wide image, sample 1: a tall one and a small one

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def model():
    return tiny_llava_next()


@pytest.fixture(scope="module")
def inputs(model):
    return llava_next_inputs(model, image_sizes=SIZES, question_lengths=(5, 3))


def _forward(model, inputs, **extra):
    with torch.no_grad():
        return model(**inputs, **extra).logits


def _token_counts(model, inputs):
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    return [int(f.shape[0]) for f in features]


def test_layout_budget_applies_per_image_over_all_tokens(model, inputs):
    counts = _token_counts(model, inputs)
    assert len(set(counts)) > 1  # anyres: images of different sizes have different token counts
    with prune(model, RECIPES["pre_llm"], budget=0.25) as handle:
        _forward(model, inputs)
    result = handle.last_selection
    assert result.num_tokens.tolist() == counts
    assert result.counts.tolist() == [int(c * 0.25 + 0.5) for c in counts]
    assert result.image_sample.tolist() == [0, 1, 1]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_keep_all_is_bit_identical(model, inputs, placement):
    base = _forward(model, inputs)
    base_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    recipe = RECIPES[placement].replace("ratio=0.5", "ratio=1.0")
    with prune(model, recipe, budget=10_000):
        out = _forward(model, inputs)
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    if placement == "vision":
        # newline tokens have no vision feature: the vision placement never keeps them
        assert out.shape[1] < base.shape[1]
        return
    assert torch.equal(out, base)
    assert torch.equal(gen, base_gen)


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_pruned_forward_and_generate_match_reference(model, inputs, placement, positions):
    feed = {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}
    with prune(model, RECIPES[placement], budget=6, positions=positions) as handle:
        out = _forward(model, feed)
        result = handle.last_selection
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
        assert torch.equal(handle.last_selection.selection.indices, result.selection.indices)
    batch, length = inputs["input_ids"].shape
    layers = model.config.text_config.num_hidden_layers
    removed = removed_by_layer(result, batch, length, layers)
    last = layers - 1
    assert generated.cache.layers[last].keys.shape[-2] == int((~removed[last]).sum(1).max()) + 7
    new_tokens = generated.sequences[:, length:]
    if positions == "compact" and placement in ("pre_llm", "vision"):
        reference_inputs = kept_only_inputs(model, inputs, removed[0])
        reference = _forward(model, reference_inputs)
        real = result.sequence_mask & inputs["attention_mask"].bool().gather(1, result.sequence_index)
        torch.testing.assert_close(out[real], reference[reference_inputs["attention_mask"].bool()], atol=ATOL, rtol=0)
        reference_inputs.pop("position_ids")
        ref_gen = model.generate(**reference_inputs, max_new_tokens=8, do_sample=False)
        assert torch.equal(new_tokens, ref_gen[:, -8:])
    else:
        with masked_reference(model, removed, positions):
            reference = _forward(model, feed)
            ref_gen = model.generate(**feed, max_new_tokens=8, do_sample=False)
        got, want = aligned(out, result, reference, inputs["attention_mask"])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        assert torch.equal(new_tokens, ref_gen[:, length:])


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("placement", ["pre_llm", "layer", "vision"])
def test_batch_equals_samples_alone(model, inputs, placement, positions):
    budgets = [5, 9, 3]
    feed = {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}
    with prune(model, RECIPES[placement], budget=budgets, positions=positions) as handle:
        out = _forward(model, feed)
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        for b, (first, count) in enumerate(((0, 1), (1, 2))):
            real = inputs["attention_mask"][b].bool()
            alone = {
                "input_ids": inputs["input_ids"][b : b + 1, real],
                "attention_mask": inputs["attention_mask"][b : b + 1, real],
                "pixel_values": inputs["pixel_values"][first : first + count],
                "image_sizes": inputs["image_sizes"][first : first + count],
            }
            handle.budget = budgets[first : first + count]
            single = _forward(model, alone)
            single_gen = model.generate(**alone, max_new_tokens=4, do_sample=False)
            torch.testing.assert_close(out[b, -single.shape[1] :], single[0], atol=ATOL, rtol=0)
            assert torch.equal(gen[b, -4:], single_gen[0, -4:])


def test_vision_signals_mask_newlines_and_align_cls(model, inputs):
    seen = []

    class Spy:
        requires = frozenset({"visual", "cls_attention"})

        class placement:  # noqa: N801 - duck-typed placement
            name = "vision"

            @staticmethod
            def drops(budget):
                from vtprune.framework.stages import Drop

                return (Drop("vision", None, budget),)

        def select(self, signals, budget):
            seen.append(signals)
            from vtprune.framework.selection import selection_from_masks

            valid = signals.valid()
            return selection_from_masks(valid, valid)

    with prune(model, Spy(), budget=10_000) as handle:
        _forward(model, inputs)
    signals = seen[-1]
    result = handle.last_selection
    counts = _token_counts(model, inputs)
    assert signals.visual.shape[:2] == (3, max(counts))
    # newline tokens are masked out; every other token is a real vision feature with its crop's CLS attention
    for r, count in enumerate(counts):
        valid = signals.visual_mask[r, :count]
        assert 0 < int((~valid).sum()) < count
        assert torch.all(signals.cls_attention[r, :, :count][:, ~valid] == 0)
        assert torch.all(signals.cls_attention[r, :, :count][:, valid] > 0)
    # base-view tokens come first: their CLS attention is the base crop's CLS row (eager CLIP attention)
    eager = tiny_llava_next(attn="eager")
    with torch.no_grad():
        crop0 = eager.model.vision_tower(inputs["pixel_values"][0, :1], output_attentions=True)
    want = crop0.attentions[len(crop0.attentions) - 2][0, :, 0, 1:]  # vision_feature_layer = -2, patch columns
    torch.testing.assert_close(signals.cls_attention[0, :, :16], want, atol=1e-6, rtol=0)
    assert signals.grid is None
    assert result.counts.tolist() == [int(signals.visual_mask[r].sum()) for r in range(3)]
