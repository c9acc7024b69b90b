"""DyCoke end to end on a tiny Qwen2.5-VL video (M-RoPE, merged 2x2 units as tokens): the prefill keeps exactly the
official TTM set of the model's own video features (tests/helpers/video_reference.py); with ``prune_ratio=0`` the
decode policy hides nothing, so ``generate`` equals the masked reference of the prefill alone; the default decode
policy records DyCoke's step counts; a left-padded batch equals each sample alone."""

from __future__ import annotations

import pytest
import torch
from adapter_fixtures import single_thread
from qwen_fixtures import MaskedReference, Sample, batch, check_batch_equals_each_sample_alone, kept_mask, tiny_qwen
from video_reference import dycoke_ttm_reference

from vtprune.framework.prune import prune
from vtprune.strategies.functional.temporal import dycoke_ttm_count

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)

FRAMES, H, W = 6, 2, 2
SAMPLES = [
    Sample(images=(), videos=((FRAMES, H, W),), question=(20, 21), seed=3),
    Sample(images=((1, 2),), videos=((FRAMES, H, W),), question=(22, 23, 24), seed=4),
]
BUDGET = dycoke_ttm_count((FRAMES, H, W), 0.3)


def _video_features(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    return list(features)


def test_prefill_keeps_the_official_ttm_set_and_generate_equals_the_masked_reference():
    model = tiny_qwen("qwen2_5_vl", layers=4)
    inputs, layouts = batch(SAMPLES)
    length = inputs["input_ids"].shape[1]
    recipe = "dycoke+decode(prefill=pre_llm,layer=3,policy=dycoke,prune_ratio=0.0)"
    with prune(model, recipe, budget=[BUDGET, 2, BUDGET]) as handle:
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
        result = handle.last_selection
    videos = _video_features(model, inputs)
    per_frame = H * W
    video_rows = [r for r in range(len(result.image_positions)) if result.num_tokens[r] == FRAMES * per_frame]
    assert len(video_rows) == 2
    for row, features in zip(video_rows, videos):
        kept = dycoke_ttm_reference(features, per_frame, 0.3)
        official = sorted(t * per_frame + p for t, ps in kept.items() for p in ps)
        assert result.drops[0].selection.row_indices(row).tolist() == official
    assert all(len(h) == 0 for record in result.decode_records for h in record.hidden)
    keep = kept_mask(result, inputs, layouts)
    tokens, _ = MaskedReference(model, inputs, keep, 0).generate(5)
    assert torch.equal(out.sequences[:, length:], tokens)


def test_default_decode_policy_prunes_the_first_step():
    model = tiny_qwen("qwen2_5_vl", layers=4)
    inputs, _ = batch(SAMPLES[:1])
    with prune(model, "dycoke", budget=BUDGET) as handle:
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
        records = handle.last_selection.decode_records
    assert records and records[0].layer == 3
    assert len(records[0].hidden[0]) == BUDGET - int(BUDGET * (1 - 0.8))


def test_batch_equals_each_sample_alone():
    model = tiny_qwen("qwen2_5_vl", layers=4)
    check_batch_equals_each_sample_alone(model, SAMPLES, "dycoke", "keep")
