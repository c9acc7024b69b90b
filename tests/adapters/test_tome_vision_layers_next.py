"""ToMe inside the CLIP tower (placement ``vision_layers``) on a tiny LLaVA-NeXT (AnyRes crops, image-newline tokens),
against an independent reference: every crop through the official ToMe block (``reference_features`` of
tests/helpers/tome_tower_reference.py, written out with the tower's weights), each patch position given its merged
token's projected value, the crops packed by the model's own ``pack_image_features``, then per merged token only the
placeholder of its first packed source kept (newline tokens kept), the other placeholders gone."""

from __future__ import annotations

import pytest
import torch

from adapter_fixtures import llava_next_inputs, sample_alone, single_thread
from tome_tower_reference import greedy, left_pad_kept, reference_features, run_tome_in_tower, tiny_llava_next_deep_tower
from vtprune import framework

REGISTRY = framework.build_registry(autoload=False)
SIZES = (((30, 50),), ((56, 56), (28, 28)))  # 3 crops; 5 crops + 1 crop: crop counts differ inside one forward

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def _crops(model, sizes):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return [image_size_to_num_patches(list(s), model.config.image_grid_pinpoints, model.config.vision_config.image_size) for s in sizes.tolist()]


def reference_images(model, inputs, schedule):
    """Per image: its packed LLM tokens (n, D) and which of them stay (n,) bool, by the reference above."""
    sizes, pixels = inputs["image_sizes"], inputs["pixel_values"]
    crops = _crops(model, sizes)
    flat = torch.cat([pixels[i, :c] for i, c in enumerate(crops)])  # (C, 3, S, S)
    projected, slots, _ = reference_features(model, flat, schedule)  # (C, k, D), (C, N)
    count, kept, width = projected.shape
    per_patch = projected.gather(1, slots.unsqueeze(-1).expand(-1, -1, width))  # (C, N, D)
    vlm = model.model
    packed, _ = vlm.pack_image_features(list(per_patch.split(crops)), sizes, "default", image_newline=vlm.image_newline)
    ids = (slots + kept * torch.arange(count)[:, None]).unsqueeze(-1).float()  # (C, N, 1): global merged token id
    packed_ids, _ = vlm.pack_image_features(list(ids.split(crops)), sizes, "default", image_newline=torch.full((1,), -1.0))
    out = []
    for tokens, carried in zip(packed, packed_ids):
        seen, keep = set(), []
        for value in carried[:, 0].long().tolist():
            keep.append(value < 0 or value not in seen)  # newline, or the first placeholder of its merged token
            seen.add(value)
        out.append((tokens, torch.tensor(keep)))
    return out


def reference_llm_input(model, inputs, schedule):
    """(embeds, mask, positions) of the reduced sequence, left padded."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        images = reference_images(model, inputs, schedule)
    flat = (ids == model.config.image_token_id).nonzero()
    drop = torch.zeros_like(mask, dtype=torch.bool)
    offset = 0
    for tokens, keep in images:
        rows = flat[offset : offset + tokens.shape[0]]
        offset += tokens.shape[0]
        embeds[rows[:, 0], rows[:, 1]] = tokens
        drop[rows[~keep, 0], rows[~keep, 1]] = True
    return (*left_pad_kept(embeds, mask, drop), images)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_tome_in_next_tower_equals_the_reference(attn):
    model = tiny_llava_next_deep_tower(attn)
    inputs = llava_next_inputs(model, SIZES, (5, 3), seed=4)
    pruned, result, generated, tower = run_tome_in_tower(
        model, inputs, REGISTRY, lambda: model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    )
    ref_embeds, ref_mask, ref_pos, images = reference_llm_input(model, inputs, [2, 2, 2, 2])  # 17 -> 9 per crop
    for packed, (tokens, _) in zip(tower, images):  # the tower + projector + packing output: the official block's
        torch.testing.assert_close(packed, tokens, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        reference = model(inputs_embeds=ref_embeds, attention_mask=ref_mask, position_ids=ref_pos).logits
    torch.testing.assert_close(pruned[:, -1], reference[:, -1], atol=1e-5, rtol=1e-5)
    expected = greedy(model, ref_embeds, ref_mask, ref_pos, 4)
    assert torch.equal(generated[:, inputs["input_ids"].shape[1] :], expected)
    record = result.drops[0]
    selection = record.selection
    assert record.where == "vision_layers"
    for r, (tokens, keep) in enumerate(images):
        n = tokens.shape[0]
        assert int(result.num_tokens[r]) == n
        assert torch.equal(selection.indices[r, : int(selection.counts[r])], keep.nonzero().flatten())
        assert int(selection.sizes[r].sum()) == n  # every packed token stands behind exactly one kept token
        assignment = selection.assignment[r, :n]
        assert torch.equal(torch.bincount(assignment, minlength=selection.sizes.shape[1]), selection.sizes[r])
        kept = selection.indices[r, : int(selection.counts[r])]
        assert torch.equal(assignment[kept], torch.arange(kept.numel()))  # a kept token is its own slot
    assert selection.counts.tolist() == [int(k.sum()) for _, k in images]
    assert bool((selection.counts < result.num_tokens).all())  # the merge removed placeholders of every image


@pytest.mark.parametrize("budget", [16, 1.0])
def test_keep_all_is_the_unpruned_next_model(budget):
    model = tiny_llava_next_deep_tower("sdpa")
    inputs = llava_next_inputs(model, SIZES, (5, 3), seed=6)
    with torch.no_grad():
        plain = model(**inputs).logits
        plain_generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with framework.prune(model, "tome", budget=budget, registry=REGISTRY) as handle, torch.no_grad():
        pruned = model(**inputs).logits
        counts = handle.last_selection.counts
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(pruned, plain) and torch.equal(generated, plain_generated)
    assert torch.equal(counts, handle.last_selection.num_tokens)


def test_next_budget_is_per_crop_and_batch_equals_alone():
    model = tiny_llava_next_deep_tower("sdpa")
    inputs = llava_next_inputs(model, SIZES, (5, 3), seed=5)
    crops = _crops(model, inputs["image_sizes"])
    with framework.prune(model, "tome", budget=5, registry=REGISTRY) as handle, torch.no_grad():
        batch = model(**inputs).logits
        record = handle.last_selection.drops[0].selection
        alone = []
        first = 0
        for b, sample in enumerate(SIZES):
            alone.append(model(**sample_alone(inputs, b, first, len(sample))).logits)
            first += len(sample)
    ones = torch.ones(sum(crops), 16, 1)
    packed, _ = model.model.pack_image_features(list(ones.split(crops)), inputs["image_sizes"], "default", image_newline=torch.zeros(1))
    newlines = [int((p == 0).sum()) for p in packed]
    # r derived from the budget: 5 merged tokens per crop (fewer where the unpadding cut all of a token's sources)
    # plus the image's newline tokens
    assert all(newlines[r] < int(record.counts[r]) <= 5 * c + newlines[r] for r, c in enumerate(crops))
    assert int(record.counts[0]) < int(handle.last_selection.num_tokens[0])
    for b in range(2):
        torch.testing.assert_close(batch[b, -1], alone[b][0, -1], atol=1e-5, rtol=1e-5)
