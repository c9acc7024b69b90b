"""Placement ``decode`` end to end on the tiny LLaVA: ``generate`` equals a manual greedy loop on the *unpruned*
model whose attention masks hide exactly the entries the prefill removed and, at each step, the entries the
step's `DecodeRecord` reports (from layer ``layer`` on); batch == each sample alone."""

from __future__ import annotations

import pytest
import torch
from adapter_fixtures import (
    generation_positions,
    llava_inputs,
    masked_reference,
    removed_by_layer,
    sample_alone,
    tiny_llava,
)

from vtprune.framework.prune import prune

STEPS = 5


def _reference_loop(model, inputs, result, layer: int, steps: int) -> torch.Tensor:
    """Greedy tokens of the unpruned model under masks: the prefill's removals, then per step the recorded hides."""
    batch, length = inputs["input_ids"].shape
    layers = model.config.text_config.num_hidden_layers
    removed = removed_by_layer(result, batch, length, layers)
    mask = inputs["attention_mask"]
    positions = generation_positions(mask)
    with torch.no_grad(), masked_reference(model, removed):
        out = model(**inputs, position_ids=positions, use_cache=True)
    cache = out.past_key_values
    token = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    tokens = [token]
    for step in range(steps - 1):
        record = result.decode_records[step]
        step_removed = []
        for number in range(layers):
            rem = removed[number].clone()
            if number >= layer:
                for b, hidden in enumerate(record.hidden):
                    rem[b, hidden] = True
            step_removed.append(rem)
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
        position = positions[:, -1:] + step + 1
        with torch.no_grad(), masked_reference(model, step_removed):
            out = model(input_ids=token, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    return torch.cat(tokens, dim=1)


@pytest.mark.parametrize(
    "recipe, layer",
    [
        ("attention+critical+fps+decode(prefill='layer(k=2)',layer=3,keep=4)", 3),
        ("attention+critical+fps+decode(prefill='layer(k=1)',layer=1,keep=0.5,mode=evict)", 1),
        ("prompt_cosine+critical+fps+decode(layer=2,keep=3)", 2),
        ("attention+critical+fps+decode(prefill='schedule(layers=[1,3],ratio=0.5)',layer=1,policy=final)", 1),
    ],
)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_equals_masked_greedy_reference(recipe, layer, attn):
    torch.manual_seed(0)
    model = tiny_llava(attn=attn)
    inputs = llava_inputs(model, images_per_sample=(1, 1), question_lengths=(3, 6))
    length = inputs["input_ids"].shape[1]
    with prune(model, recipe, budget=6) as handle:
        generated = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
        result = handle.last_selection
    assert len(result.decode_records) == STEPS - 1
    image = inputs["input_ids"] == model.config.image_token_id
    for record in result.decode_records:
        assert record.layer == layer
        for b, hidden in enumerate(record.hidden):
            assert bool(image[b, hidden].all())  # only visual entries are ever hidden
    if "policy=final" not in recipe:
        assert any(len(h) for r in result.decode_records for h in r.hidden)
    reference = _reference_loop(model, inputs, result, layer, STEPS)
    assert torch.equal(generated[:, length:], reference)


def test_evict_never_brings_an_entry_back_and_dynamic_keeps_the_count():
    model = tiny_llava()
    inputs = llava_inputs(model, images_per_sample=(1,))
    for mode in ("evict", "dynamic"):
        with prune(model, f"attention+critical+fps+decode(prefill='layer(k=1)',layer=2,keep=3,mode={mode})", budget=8) as handle:
            model.generate(**inputs, max_new_tokens=6, do_sample=False)
            records = handle.last_selection.decode_records
        sizes = [len(r.hidden[0]) for r in records]
        assert sizes == [8 - 3] * len(records)  # 8 visual entries after prefill, 3 kept per step
        if mode == "evict":
            assert all(torch.equal(r.hidden[0], records[0].hidden[0]) for r in records)


def test_batch_equals_each_sample_alone():
    model = tiny_llava()
    inputs = llava_inputs(model, images_per_sample=(1, 1), question_lengths=(2, 7))
    recipe = "attention+critical+fps+decode(prefill='layer(k=2)',layer=2,keep=0.5)"
    with prune(model, recipe, budget=[5, 7]) as handle:
        batch = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        batch_records = handle.last_selection.decode_records
        offset = inputs["input_ids"].shape[1]
        for b, budget in enumerate((5, 7)):
            sample = sample_alone(inputs, b, b, 1)
            handle.budget = budget
            alone = model.generate(**sample, max_new_tokens=4, do_sample=False)
            assert torch.equal(batch[b, offset:], alone[0, sample["input_ids"].shape[1] :])
            pad = offset - sample["input_ids"].shape[1]
            for mine, theirs in zip(batch_records, handle.last_selection.decode_records):
                assert torch.equal(mine.hidden[b] - pad, theirs.hidden[0])
