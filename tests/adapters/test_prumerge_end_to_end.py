"""PruMerge / PruMerge+ end to end on the tiny LLaVA: the adapter's signals (hint ``full_width_cls_attention``: the
CLS row and keys of the tower layer after the feature layer, one full-width head) and what the LLM receives,
against the loop-style official reference (tests/helpers/prumerge_reference.py) run on the tower's own hidden
states. The registry-generated cases (tests/adapters/test_peers_end_to_end.py) add keep-all, batch == alone and
LLaVA-NeXT. ``diversity.prumerge(order=official)``: the LLM receives the official sequence itself ([kept list, extra
token] in the official order, in the image's first slots), and with ``compact`` positions the logits and greedy
tokens equal the model fed that sequence as ``inputs_embeds`` in place of the image's placeholders.
"""

from __future__ import annotations

import pytest
import torch

from adapter_fixtures import (
    IMAGE_TOKEN_ID,
    generation_positions,
    llava_inputs,
    lm_inputs_recorder,
    record_hooks,
    sample_alone,
    single_thread,
    tiny_llava,
)
from prumerge_reference import official_attention_and_keys, official_prumerge
from vtprune import framework

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def case():
    model = tiny_llava(layers=2)
    tower = model.model.vision_tower
    last = getattr(tower, "vision_model", tower).encoder.layers[-1].self_attn
    with torch.no_grad():  # sharper CLS attention in the random tower: 1 and 2 IQR outliers in the two images
        last.q_proj.weight.mul_(3.0)
        last.k_proj.weight.mul_(3.0)
    inputs = llava_inputs(model, (1, 1), (5, 3), seed=0)
    return model, inputs


def _official(model, inputs, plus):
    """Per image: the official output sequence (1, L + 1, Dv) and its kept list, from the tower's own states."""
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    with torch.no_grad():
        hidden = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2]  # (images, 1 + n, Dv)
        cls_attn, keys = official_attention_and_keys(layers[len(layers) - 1], hidden)  # the layer after -2
        return [official_prumerge(hidden[r : r + 1, 1:], cls_attn[r : r + 1], keys[r : r + 1], plus) for r in range(2)]


@pytest.mark.parametrize("preset,plus", [("prumerge", False), ("prumerge_plus", True)])
def test_llm_receives_the_official_merged_tokens(case, preset, plus):
    model, inputs = case
    n = 16
    with framework.prune(model, preset, budget=n - 1) as handle, torch.no_grad():  # a cap above the official count
        seen, hook = lm_inputs_recorder(model)
        try:
            model(**inputs)
        finally:
            hook.remove()
    record = handle.last_selection.drops[0]
    embeds = seen[-1]
    outliers = 0
    for r, (sequence, order) in enumerate(_official(model, inputs, plus)):
        kept = torch.zeros(n, dtype=torch.bool)
        kept[order] = True
        pruned = (~kept).nonzero().flatten()
        outliers += order.numel()
        # our layout: the kept list plus the extra token at the last pruned position, ascending
        positions = torch.cat([order, pruned[-1:]])
        assert record.selection.row_indices(r).tolist() == sorted(positions.tolist())
        by_position = dict(zip(positions.tolist(), sequence[0]))
        want_vision = torch.stack([by_position[p] for p in sorted(by_position)])  # (count, Dv)
        with torch.no_grad():
            want = model.model.multi_modal_projector(want_vision.float())
        image = inputs["input_ids"][r] == IMAGE_TOKEN_ID
        slots = handle.last_selection.sequence_index[r]
        got = embeds[r][image.gather(0, slots) & handle.last_selection.sequence_mask[r]]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert outliers >= 3  # the case exercises the merge (different adaptive counts per image), not only the extra token


def test_feature_layer_without_a_following_layer_is_a_clear_error():
    model = tiny_llava(layers=1)
    model.config.vision_feature_layer = -1  # the tower's last layer: nothing follows it
    model.model.config.vision_feature_layer = -1
    before = record_hooks(model)
    with pytest.raises(ValueError, match="following layer"):
        framework.prune(model, "prumerge", budget=8)
    assert record_hooks(model) == before


def _official_order_recipe(plus: bool) -> str:
    return f"relevance.none+critical+diversity.prumerge(plus={plus},order=official)+budget.prumerge+vision"


def _official_sequence_inputs(model, inputs, plus: bool) -> dict:
    """``inputs_embeds`` / ``attention_mask`` / ``position_ids`` (left padded) of each sample with its image's
    placeholders replaced by the projected official sequence [kept list in the official order, extra token]."""
    embeds = model.model.get_input_embeddings()(inputs["input_ids"])
    rows = []
    for r, (sequence, _) in enumerate(_official(model, inputs, plus)):  # one image per sample
        real = inputs["attention_mask"][r].bool()
        ids, row = inputs["input_ids"][r][real], embeds[r][real]
        image = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
        with torch.no_grad():
            projected = model.model.multi_modal_projector(sequence[0].float())  # (L + 1, D)
        rows.append(torch.cat([row[: image[0]], projected.to(row.dtype), row[image[-1] + 1 :]]))
    width = max(r.shape[0] for r in rows)
    out = torch.zeros(len(rows), width, embeds.shape[-1], dtype=embeds.dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        out[b, width - row.shape[0] :], mask[b, width - row.shape[0] :] = row, 1
    return {"inputs_embeds": out, "attention_mask": mask, "position_ids": generation_positions(mask)}


@pytest.mark.parametrize("plus", [False, True])
def test_official_order_gives_the_llm_the_official_sequence(case, plus):
    model, inputs = case
    n = 16
    feed = {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}
    with framework.prune(model, _official_order_recipe(plus), budget=n - 1, positions="compact") as handle, torch.no_grad():
        seen, hook = lm_inputs_recorder(model)
        try:
            logits = model(**feed).logits
        finally:
            hook.remove()
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    result = handle.last_selection
    reference = _official_sequence_inputs(model, inputs, plus)
    with torch.no_grad():
        want = model(**reference).logits
        want_generated = model.generate(**reference, max_new_tokens=6, do_sample=False)
    real = result.sequence_mask & inputs["attention_mask"].bool().gather(1, result.sequence_index)
    ref_real = reference["attention_mask"].bool()
    torch.testing.assert_close(seen[0][real], reference["inputs_embeds"][ref_real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[real], want[ref_real], atol=1e-5, rtol=1e-5)
    assert torch.equal(generated[:, -6:], want_generated[:, -6:])
    for r, (_, order) in enumerate(_official(model, inputs, plus)):  # the record still names the kept tokens
        kept = torch.zeros(n, dtype=torch.bool)
        kept[order] = True
        extra = (~kept).nonzero().flatten()[-1:]
        assert result.drops[0].selection.row_indices(r).tolist() == sorted(order.tolist() + extra.tolist())


def test_official_order_batch_equals_each_sample_alone_and_keep_all(case):
    model, inputs = case
    feed = {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}
    with framework.prune(model, _official_order_recipe(True), budget=15, positions="compact") as handle, torch.no_grad():
        batch = model(**feed).logits
        for b in range(2):
            alone = sample_alone(inputs, b, b, 1)
            single = model(**alone).logits
            torch.testing.assert_close(batch[b, -single.shape[1] :], single[0], atol=1e-5, rtol=0)
        handle.budget = 1.0
        with torch.no_grad():
            whole = model(**feed).logits
    with torch.no_grad():
        assert torch.equal(whole, model(**feed).logits)
    with pytest.raises(ValueError, match="order"):
        framework.compose("relevance.none+critical+diversity.prumerge(order=spatial)+budget.prumerge+vision")
