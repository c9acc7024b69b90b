"""ToMe inside the CLIP tower (placement ``vision_layers``) on a tiny LLaVA, against an independent reference: the
official ToMe block (tome/patch/timm.py ``ToMeBlock`` / ``ToMeAttention`` @ af95e4b1) written out with the tower's
own weights in tests/helpers/tome_tower_reference.py (merge between attention and MLP, keys averaged over heads,
class token protected, ``log(size)`` added to the logits), then the LLM fed the merged tokens in the image's first
placeholder slots and nothing else."""

from __future__ import annotations

import pytest
import torch

from adapter_fixtures import llava_inputs, sample_alone, single_thread
from tome_tower_reference import check_first_slots_reference, reference_features, run_tome_in_tower, tiny_llava_deep_tower
from vtprune import framework

REGISTRY = framework.build_registry(autoload=False)

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_tome_in_tower_equals_the_official_block(attn):
    model = tiny_llava_deep_tower(attn)
    inputs = llava_inputs(model, (1, 2), (5, 3), seed=4)
    schedule = [2, 2, 2, 2]  # official constant r: 17 -> 9 tokens (8 patches) over the 4 merging layers
    pruned, result, generated, _ = run_tome_in_tower(model, inputs, REGISTRY)
    with torch.no_grad():
        projected, slots, sizes = reference_features(model, inputs["pixel_values"], schedule)
    kept = projected.shape[1]
    record = result.drops[0]
    assert record.where == "vision_layers" and kept == 8
    assert torch.equal(record.selection.assignment, slots) and torch.equal(record.selection.sizes, sizes.round().long())
    assert torch.equal(record.selection.sizes.sum(1), torch.full((3,), 16))
    check_first_slots_reference(model, inputs, projected, pruned, generated, steps=4)


def test_budget_derives_r_and_batch_equals_alone():
    model = tiny_llava_deep_tower("sdpa")
    inputs = llava_inputs(model, (1, 1), (5, 3), seed=5)
    with framework.prune(model, "tome", budget=5, registry=REGISTRY) as handle, torch.no_grad():
        batch = model(**inputs).logits
        counts = handle.last_selection.counts
        alone = []
        for b in range(2):
            alone.append(model(**sample_alone(inputs, b, b, 1)).logits)
    assert counts.tolist() == [5, 5]  # r derived from the budget: exactly the budget remains
    for b in range(2):
        torch.testing.assert_close(batch[b, -1], alone[b][0, -1], atol=1e-5, rtol=1e-5)


def test_vision_layers_needs_the_tome_stage_and_a_clip_adapter():
    model = tiny_llava_deep_tower("sdpa")
    with pytest.raises(ValueError, match="diversity.tome"):
        framework.prune(model, "relevance.none+diversity.fps+placement.vision_layers", budget=4, registry=REGISTRY)
