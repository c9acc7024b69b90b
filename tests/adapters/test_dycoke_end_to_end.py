"""DyCoke end to end on the tiny LLaVA-OneVision with video inputs: the prefill keeps exactly the official TTM set
of the model's own video features (tests/helpers/video_reference.py) at the official count; ``generate`` equals a
greedy loop on the unpruned model whose masks hide the prefill's removals and each step's recorded entries; the
decode records follow DyCoke's policy (first step prunes to ``int(n * 0.2)``, later steps prune all-or-nothing);
batch == each sample alone."""

from __future__ import annotations

import torch
from adapter_fixtures import generation_positions, llava_onevision_inputs, masked_reference, removed_by_layer, tiny_llava_onevision
from video_reference import dycoke_ttm_reference

from vtprune.framework.prune import prune
from vtprune.strategies.functional.temporal import dycoke_ttm_count

STEPS = 5
FRAMES = 6
VIDEO = ((("video",),), (("video",),))


def _reference_loop(model, inputs, result, layer: int, steps: int) -> torch.Tensor:
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


def _setup(attn: str = "sdpa"):
    model = tiny_llava_onevision(attn=attn)
    inputs = llava_onevision_inputs(model, VIDEO, question_lengths=(3, 6), frames=FRAMES)
    with torch.no_grad():
        videos = list(model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output)  # (T*P + 1, D)
    per_frame = (videos[0].shape[0] - 1) // FRAMES
    side = int(per_frame**0.5)
    budget = dycoke_ttm_count((FRAMES, side, side), 0.3) + 1  # + the video's newline
    return model, inputs, videos, per_frame, budget


def test_prefill_keeps_the_official_ttm_set_and_generate_equals_the_masked_reference():
    model, inputs, videos, per_frame, budget = _setup()
    length = inputs["input_ids"].shape[1]
    with prune(model, "dycoke", budget=budget) as handle:
        generated = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
        result = handle.last_selection
    selection = result.drops[0].selection
    for row, features in enumerate(videos):
        kept = dycoke_ttm_reference(features[:-1], per_frame, 0.3)
        official = {t * per_frame + p for t, ps in kept.items() for p in ps} | {features.shape[0] - 1}
        assert set(selection.row_indices(row).tolist()) == official
    records = result.decode_records
    assert len(records) == STEPS - 1
    hidden_when_pruned = budget - int(budget * (1 - 0.8))  # n visual entries, int(n * (1 - dycoke_p)) kept
    for step, record in enumerate(records):
        assert record.layer == 3
        allowed = {hidden_when_pruned} if step == 0 else {0, hidden_when_pruned}  # the first step always prunes
        assert {len(hidden) for hidden in record.hidden} <= allowed
    reference = _reference_loop(model, inputs, result, 3, STEPS)
    assert torch.equal(generated[:, length:], reference)


def test_threshold_gates_the_steps():
    model, inputs, _, _, budget = _setup()
    with prune(model, "dycoke+decode(prefill=pre_llm,layer=3,policy=dycoke,threshold=-1.0)", budget=budget) as handle:
        model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
        records = handle.last_selection.decode_records
    # cosine >= -1 always: only the first step (no previous attention) prunes
    assert all(len(h) > 0 for h in records[0].hidden)
    assert all(len(h) == 0 for r in records[1:] for h in r.hidden)
    with prune(model, "dycoke+decode(prefill=pre_llm,layer=3,policy=dycoke,threshold=1.0)", budget=budget) as handle:
        model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
        records = handle.last_selection.decode_records
    assert all(len(h) == budget - int(budget * (1 - 0.8)) for r in records for h in r.hidden)


def test_batch_equals_each_sample_alone():
    model, inputs, _, _, budget = _setup()
    offset = inputs["input_ids"].shape[1]
    with prune(model, "dycoke", budget=budget) as handle:
        batch = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        batch_records = handle.last_selection.decode_records
        for b in range(2):
            real = inputs["attention_mask"][b].bool()
            sample = {
                "input_ids": inputs["input_ids"][b : b + 1, real],
                "attention_mask": inputs["attention_mask"][b : b + 1, real],
                "pixel_values_videos": inputs["pixel_values_videos"][b : b + 1],
            }
            alone = model.generate(**sample, max_new_tokens=4, do_sample=False)
            assert torch.equal(batch[b, offset:], alone[0, sample["input_ids"].shape[1] :])
            pad = offset - sample["input_ids"].shape[1]
            for mine, theirs in zip(batch_records, handle.last_selection.decode_records):
                assert torch.equal(mine.hidden[b] - pad, theirs.hidden[0])
