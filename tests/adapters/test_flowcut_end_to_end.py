"""FlowCut inside the CLIP tower (preset ``flowcut``: ``relevance.flowcut`` at placement ``vision_layers``) on a tiny
LLaVA with a 9-layer tower, against the official encoder loop re-told in tests/helpers/flowcut_reference.py (one image
at a time: the official count is shared by the batch, ours is per image by default; with
``relevance.flowcut(count=batch)`` against the reference's batched run): the same patches kept at every pruning
layer, the same feature-layer states, then the LLM fed the kept patches in the image's first placeholder slots."""

from __future__ import annotations

import pytest
import torch

from adapter_fixtures import (
    generation_positions,
    llava_inputs,
    record_hooks,
    sample_alone,
    single_thread,
    tiny_llava,
    tiny_llava_next,
)
from flowcut_reference import reference_flowcut, reference_projected, tiny_llava_flowcut_tower, video_llava_image_inputs
from tome_tower_reference import check_first_slots_reference, tiny_video_llava_deep_tower
from vtprune import framework
from vtprune.framework.errors import BudgetError, VtpruneError

REGISTRY = framework.build_registry(autoload=False)

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def _kept_patches(record) -> list[torch.Tensor]:
    """Per image, the patches the record says were kept (assignment >= 0), ascending."""
    assignment = record.selection.assignment
    return [(assignment[r] >= 0).nonzero().flatten() for r in range(assignment.shape[0])]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("budget", [1, 10, 40])
def test_flowcut_keeps_the_official_patches_and_features(attn, budget):
    model = tiny_llava_flowcut_tower(attn)
    inputs = llava_inputs(model, (1, 2), (5, 3), seed=4)
    pixels = inputs["pixel_values"]
    with torch.no_grad():
        model(**inputs, output_hidden_states=True)  # transformers installs its output-recording hooks once
    before = record_hooks(model)
    with framework.prune(model, "flowcut", budget=budget, registry=REGISTRY) as handle, torch.no_grad():
        pruned = model(**inputs, position_ids=generation_positions(inputs["attention_mask"])).logits
        record = handle.last_selection.drops[0]
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        steps = handle._attachment.tower_merge.take().kept  # patches kept per pruning layer, per image
        features = [model.model.vision_tower(image[None], output_hidden_states=True).hidden_states[-2] for image in pixels]
        image_features = torch.stack(list(model.model.get_image_features(pixels).pooler_output))  # (images, 64, D)
    assert record_hooks(model) == before
    projected, kept = reference_projected(model, pixels, budget)
    torch.testing.assert_close(image_features[:, :budget], projected, atol=1e-5, rtol=1e-5)  # kept patches first
    assert not bool(image_features[:, budget:].any())  # then the zero padding of the dropped placeholders
    assert record.where == "vision_layers" and record.selection.counts.tolist() == [budget] * 3
    for image in range(3):
        assert torch.equal(_kept_patches(record)[image], kept[image])
        with torch.no_grad():
            state, _, left = reference_flowcut(model.model.vision_tower, pixels[image : image + 1], budget)
        assert [int(step[image]) + 1 for step in steps] == left  # every pruning layer, CLS counted
        torch.testing.assert_close(features[image], state, atol=1e-5, rtol=1e-5)
    assert len(steps) == 4 and any(int(s) < 64 for s in steps[0])  # layers 0, 2, 4 adaptive (some pruning), 6 forced
    check_first_slots_reference(model, inputs, projected, pruned, generated, steps=4)


@pytest.mark.parametrize("budget", [64, 100, 1.0])
def test_keep_all_is_the_unpruned_model(budget):
    model = tiny_llava_flowcut_tower("sdpa")
    inputs = llava_inputs(model, (1, 2), (5, 3), seed=4)
    with torch.no_grad():
        full = model(**inputs).logits
    with framework.prune(model, "flowcut", budget=budget, registry=REGISTRY) as handle, torch.no_grad():
        kept = model(**inputs).logits
        record = handle.last_selection.drops[0]
    assert torch.equal(kept, full)
    assert record.selection.counts.tolist() == [64] * 3
    assert record.selection.assignment.tolist() == [list(range(64))] * 3


def test_batch_equals_alone_with_ragged_counts_inside_the_tower():
    model = tiny_llava_flowcut_tower("sdpa")
    inputs = llava_inputs(model, (1, 2), (5, 3), seed=4)
    with framework.prune(model, "flowcut", budget=10, registry=REGISTRY) as handle, torch.no_grad():
        batch = model(**inputs).logits
        batch_kept = _kept_patches(handle.last_selection.drops[0])
        steps = handle._attachment.tower_merge.take().kept
        alone, alone_kept = [], []
        for b, (first, count) in enumerate([(0, 1), (1, 2)]):
            alone.append(model(**sample_alone(inputs, b, first, count)).logits)
            alone_kept.extend(_kept_patches(handle.last_selection.drops[0]))
    assert len({int(n) for n in steps[0]}) > 1  # the images kept different counts at the first pruning layer
    for image in range(3):
        assert torch.equal(batch_kept[image], alone_kept[image])
    for b in range(2):
        torch.testing.assert_close(batch[b, -1], alone[b][0, -1], atol=1e-5, rtol=1e-5)


def test_official_batch_count_differs_from_per_image_counts():
    """The deviation docs/methods.md states: the official loop prunes the batch by its largest count (``r.max(0)``);
    vtprune counts per image (a batch gives each image what it gets alone)."""
    model = tiny_llava_flowcut_tower("eager")
    pixels = llava_inputs(model, (1, 2), (5, 3), seed=4)["pixel_values"]
    with torch.no_grad():
        _, _, shared = reference_flowcut(model.model.vision_tower, pixels, 10)
        own = [reference_flowcut(model.model.vision_tower, image[None], 10)[2] for image in pixels]
    assert shared != own[0] or shared != own[1] or shared != own[2]
    assert all(s <= min(o[i] for o in own) for i, s in enumerate(shared))  # the batch prunes by its largest count


BATCH_COUNT = "flowcut+relevance.flowcut(count=batch)"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("images_per_sample", [(1,), (1, 1), (1, 2)], ids=["B1", "B2", "B3"])
def test_batch_count_keeps_the_official_batched_patches(images_per_sample, attn):
    """``count='batch'``: every image of the tower batch prunes the batch's count (official ``r.max(0)``), against
    the reference's batched run of the official loop: the same patches and counts at every pruning layer (rows
    equal-length), the same projected features, logits and ``generate``; the shared count is not any image's own."""
    model = tiny_llava_flowcut_tower(attn)
    inputs = llava_inputs(model, images_per_sample, seed=7)
    pixels = inputs["pixel_values"]
    images = pixels.shape[0]
    with framework.prune(model, BATCH_COUNT, budget=10, registry=REGISTRY) as handle, torch.no_grad():
        pruned = model(**inputs, position_ids=generation_positions(inputs["attention_mask"])).logits
        record = handle.last_selection.drops[0]
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        run = handle._attachment.tower_merge.take()
        image_features = torch.stack(list(model.model.get_image_features(pixels).pooler_output))  # (images, 64, D)
    projected, kept = reference_projected(model, pixels, 10, batched=True)
    with torch.no_grad():
        _, _, shared = reference_flowcut(model.model.vision_tower, pixels, 10)
        own = [reference_flowcut(model.model.vision_tower, image[None], 10)[2] for image in pixels]
    assert run.present is None  # no padding ever arose
    assert [step.tolist() for step in run.kept] == [[left - 1] * images for left in shared]  # CLS counted there
    assert shared[0] < 64 and shared[-1] == 11  # the adaptive layers pruned; the last one reached the target
    assert images == 1 or any(o != shared for o in own)  # the batch's count is not every image's own
    for image in range(images):
        assert torch.equal(_kept_patches(record)[image], kept[image])
    torch.testing.assert_close(image_features[:, :10], projected, atol=1e-5, rtol=1e-5)
    assert not bool(image_features[:, 10:].any())
    check_first_slots_reference(model, inputs, projected, pruned, generated, steps=4)


def test_batch_count_of_one_image_is_the_per_image_count():
    model = tiny_llava_flowcut_tower("sdpa")
    inputs = llava_inputs(model, (1,), seed=7)
    results = []
    for recipe in ("flowcut", BATCH_COUNT):
        with framework.prune(model, recipe, budget=10, registry=REGISTRY) as handle, torch.no_grad():
            logits = model(**inputs).logits
            steps = [step.tolist() for step in handle._attachment.tower_merge.take().kept]
            results.append((logits, _kept_patches(handle.last_selection.drops[0])[0], steps))
    (image_logits, image_kept, image_steps), (batch_logits, batch_kept, batch_steps) = results
    assert torch.equal(batch_logits, image_logits)
    assert torch.equal(batch_kept, image_kept) and batch_steps == image_steps
    assert image_steps[0][0] < 64  # the adaptive count acted


def test_batch_count_makes_an_image_depend_on_its_batch_mates():
    """By design (docs/methods.md, "FlowCut"): with ``count='batch'`` a batch is not its samples alone."""
    model = tiny_llava_flowcut_tower("sdpa")
    inputs = llava_inputs(model, (1, 2), (5, 3), seed=7)
    with framework.prune(model, BATCH_COUNT, budget=10, registry=REGISTRY) as handle, torch.no_grad():
        model(**inputs)
        batch_kept = _kept_patches(handle.last_selection.drops[0])
        alone_kept = []
        for b, (first, count) in enumerate([(0, 1), (1, 2)]):
            model(**sample_alone(inputs, b, first, count))
            alone_kept.extend(_kept_patches(handle.last_selection.drops[0]))
    assert any(not torch.equal(batch_kept[i], alone_kept[i]) for i in range(3))


def test_a_bad_count_names_the_choices():
    model = tiny_llava_flowcut_tower("sdpa")
    with pytest.raises(VtpruneError, match="parameter 'count' must be one of 'image' \\| 'batch', got 'batches'"):
        framework.prune(model, "flowcut+relevance.flowcut(count=batches)", budget=4, registry=REGISTRY)
    assert framework.compose(BATCH_COUNT, registry=REGISTRY).relevance.count == "batch"
    assert framework.compose("flowcut", registry=REGISTRY).relevance.count == "image"  # the preset is unchanged


def test_flowcut_needs_its_own_schedule_a_clip_tower_and_layers_before_the_feature():
    model = tiny_llava_flowcut_tower("sdpa")
    with pytest.raises(ValueError, match="diversity.none"):
        framework.prune(model, "relevance.flowcut+diversity.fps+placement.vision_layers", budget=4, registry=REGISTRY)
    with pytest.raises(ValueError, match="diversity.none"):
        framework.prune(model, "flowcut+placement.vision_layers(r=2)", budget=4, registry=REGISTRY)
    shallow = tiny_llava_flowcut_tower("sdpa")
    shallow.config.vision_feature_layer = 0  # the embeddings: no layer's attention to score with
    with pytest.raises(ValueError, match="vision_feature_layer=0"):
        framework.prune(shallow, "flowcut", budget=4, registry=REGISTRY)
    with pytest.raises(VtpruneError, match="does not run relevance.flowcut at placement 'vision_layers' .FlowCut's AnyRes path"):
        framework.prune(tiny_llava_next(), "flowcut", budget=4, registry=REGISTRY)  # the support check's limitation
    with pytest.raises(BudgetError, match="positive token count"):
        framework.prune(model, "flowcut", budget=0, registry=REGISTRY)


def test_the_smallest_budget_keeps_one_patch_per_image():
    """A fraction below one patch resolves to one patch (the budget allocator's floor); the ``rpl == 0`` layer always
    reaches it."""
    model = tiny_llava_flowcut_tower("sdpa")
    inputs = llava_inputs(model, (1, 2), (5, 3), seed=4)
    with framework.prune(model, "flowcut", budget=0.001, registry=REGISTRY) as handle, torch.no_grad():
        model(**inputs)
        record = handle.last_selection.drops[0]
    assert record.selection.counts.tolist() == [1, 1, 1]
    assert [int((row >= 0).sum()) for row in record.selection.assignment] == [1, 1, 1]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_flowcut_in_video_llavas_image_tower(attn):
    """Video-LLaVA's image tower (5 layers, feature layer -2: pruning at layers 0 and 2) against the same reference;
    a forward with a video row raises."""
    model = tiny_video_llava_deep_tower(attn)
    inputs = video_llava_image_inputs(model, seed=4)
    with framework.prune(model, "flowcut", budget=6, registry=REGISTRY) as handle, torch.no_grad():
        pruned = model(**inputs, position_ids=generation_positions(inputs["attention_mask"])).logits
        record = handle.last_selection.drops[0]
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    projected, kept = reference_projected(model, inputs["pixel_values"], 6, tower=model.model.image_tower)
    for image in range(3):
        assert torch.equal(_kept_patches(record)[image], kept[image])
    check_first_slots_reference(model, inputs, projected, pruned, generated, steps=4)
    with framework.prune(model, "flowcut", budget=6, registry=REGISTRY), torch.no_grad():
        with pytest.raises(ValueError, match="video row"):
            model(**video_llava_image_inputs(model, (1, 1), seed=5, video=True))


def test_the_support_report_reads_stage_limitations():
    """``limitations["relevance.flowcut"]`` (LLaVA-NeXT) makes every pipeline containing the stage unsupported there,
    with the reason; the same stage elsewhere and other pipelines on LLaVA-NeXT are unaffected."""
    from vtprune.framework import compose
    from vtprune.framework.support import support_problems

    adapters = REGISTRY.adapters
    flowcut = compose("flowcut", registry=REGISTRY)
    problems = support_problems(adapters["llava_next"].obj, flowcut)
    assert len(problems) == 1 and "relevance.flowcut" in problems[0] and "AnyRes" in problems[0]
    assert support_problems(adapters["llava_next"].obj, compose("flowcut+diversity.fps+pre_llm", registry=REGISTRY))
    assert not support_problems(adapters["llava"].obj, flowcut)
    assert not support_problems(adapters["video_llava"].obj, flowcut)
    assert not support_problems(adapters["llava_next"].obj, compose("tome", registry=REGISTRY))


@pytest.mark.parametrize("feature_layer", [-2, 1])
def test_a_feature_layer_with_no_layer_before_it_cuts_its_own_patches(feature_layer):
    """Our extension (docs/methods.md, "FlowCut"): the feature layer is layer 0 (a 2-layer tower read at -2, or at 1),
    so layer 0 scores and the forced step cuts the projector input; against the reference's same rule."""
    model = tiny_llava("eager", layers=2)
    model.config.vision_feature_layer = feature_layer
    inputs = llava_inputs(model, (1, 2), (5, 3), seed=4)
    pixels = inputs["pixel_values"]
    with framework.prune(model, "flowcut", budget=5, registry=REGISTRY) as handle, torch.no_grad():
        pruned = model(**inputs, position_ids=generation_positions(inputs["attention_mask"])).logits
        record = handle.last_selection.drops[0]
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    projected, kept = [], []
    with torch.no_grad():
        for image in pixels:
            state, index, left = reference_flowcut(model.model.vision_tower, image[None], 5, feature_layer)
            projected.append(model.model.multi_modal_projector(state[:, 1:])[0])
            kept.append(index[0])
    assert left == [6]
    for image in range(3):
        assert torch.equal(_kept_patches(record)[image], kept[image])
    check_first_slots_reference(model, inputs, torch.stack(projected), pruned, generated, steps=4)
