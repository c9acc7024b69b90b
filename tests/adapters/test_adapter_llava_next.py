"""LLaVA-NeXT adapter (AnyRes crops + image-newline tokens) against independent references."""

from __future__ import annotations

import pytest
import torch

from adapter_fixtures import (
    PLACEMENT_RECIPES,
    check_batch_equals_samples_alone,
    check_forward_and_generate,
    SignalRecorder,
    llava_next_inputs,
    sample_alone,
    single_thread,
    tiny_llava_next,
)
from adapter_fixtures import forward_logits as _forward
from family_checks import KEEP_ALL_BUDGET, NEW_TOKENS, check_keep_all_is_bit_identical, keep_all_recipe
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
    if placement != "vision":
        check_keep_all_is_bit_identical(model, inputs, RECIPES[placement], _forward)
        return
    # newline tokens have no vision feature: the vision placement never keeps them
    base = _forward(model, inputs)
    with prune(model, keep_all_recipe(RECIPES[placement]), budget=KEEP_ALL_BUDGET):
        out = _forward(model, inputs)
        model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out.shape[1] < base.shape[1]


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_pruned_forward_and_generate_match_reference(model, inputs, placement, positions):
    kept_only = positions == "compact" and placement in ("pre_llm", "vision")
    check_forward_and_generate(model, inputs, RECIPES[placement], positions, kept_only, atol=ATOL)


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("placement", ["pre_llm", "layer", "vision"])
def test_batch_equals_samples_alone(model, inputs, placement, positions):
    budgets = [5, 9, 3]
    alone = [(sample_alone(inputs, b, first, count), budgets[first : first + count])
             for b, (first, count) in enumerate(((0, 1), (1, 2)))]
    check_batch_equals_samples_alone(model, inputs, RECIPES[placement], positions, budgets, alone, atol=ATOL)


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


@pytest.mark.parametrize("recipe", ["prompt_cosine+critical+fps+pre_llm", "attention+critical+fps+schedule(layers=[1,3],ratio=0.5)"])
def test_view_index_marks_the_base_image_the_crops_and_the_newlines(model, inputs, recipe):
    """``Signals.view_index``: 0 at the base crop's tokens (the first ``patch_side ** 2`` of the image, as
    ``pack_image_features`` packs it), -1 at the ``image_newline`` tokens, 1 at the high-resolution tokens, -1 at
    padding; after an earlier drop, the present tokens keep their views."""
    from vtprune.framework import compose

    recorder = SignalRecorder(compose(recipe))
    with prune(model, recorder, budget=0.5) as handle:
        _forward(model, inputs)
    vision = model.config.vision_config
    base = (vision.image_size // vision.patch_size) ** 2
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    expected = []
    for f in features:
        views = torch.ones(f.shape[0], dtype=torch.long)
        views[:base] = 0
        views[(f == model.model.image_newline).all(-1)] = -1
        expected.append(views)
    present = [torch.arange(v.numel()) for v in expected]
    assert len(recorder.seen) == len(handle.last_selection.drops) == (2 if "schedule" in recipe else 1)
    for number, signals in enumerate(recorder.seen):
        for r, views in enumerate(expected):
            n = present[r].numel()
            assert signals.view_index[r, :n].tolist() == views[present[r]].tolist()
            assert bool((signals.view_index[r, n:] == -1).all())
        if number < len(handle.last_selection.drops):  # the next drop sees the tokens this one kept
            present = [handle.last_selection.drops[number].selection.row_indices(r) for r in range(len(expected))]
