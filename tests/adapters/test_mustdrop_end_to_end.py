"""MustDrop end to end on the tiny LLaVA: the presets `mustdrop` (dual-attention filter + key set before layers
3/7/11/15, adaptive count = the official kept set, the budget a cap; decode policy final) and `mustdrop_vision` (3x3 local merge at the vision-tower output).

What each drop selected is checked against the functional rules applied to the signals the adapter gave that
drop (recorded with `SignalRecorder`); batch == each sample alone and keep-all run for every preset in
tests/adapters/test_peers_end_to_end.py.
"""

from __future__ import annotations

import pytest
import torch
from adapter_fixtures import SignalRecorder, llava_inputs, single_thread, tiny_llava

from vtprune import framework
from vtprune.strategies.functional.mustdrop import cls_key_set, dual_attention_keep, local_merge, local_merge_to_count

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)
LAYERS = 16  # the preset's deepest drop is before layer 15


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=LAYERS)


@pytest.fixture(scope="module")
def inputs(model):
    return llava_inputs(model, (1, 1), (5, 3), seed=2)


def test_mustdrop_keeps_the_official_adaptive_set_at_every_drop(model, inputs) -> None:
    # thresholds that split the tiny model's 16 tokens (the preset's TextVQA-64 values keep all of them here)
    pipeline = framework.compose("mustdrop", global_thr=0.08, individual_thr=0.09)
    spy = SignalRecorder(pipeline)
    budget = 10  # the cap at the first drop; later drops (ratio 1.0) are capped by the tokens present
    with framework.prune(model, spy, budget=budget) as handle, torch.no_grad():
        model(**inputs)
        result = handle.last_selection
        seen = list(spy.seen)
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        decode = handle.last_selection.decode_records
    assert [d.layer for d in result.drops] == [3, 7, 11, 15]
    assert len(seen) == 4
    official_counts = []
    present = [torch.arange(16), torch.arange(16)]  # 4 x 4 patches per image
    for number, (record, signals) in enumerate(zip(result.drops, seen)):
        valid = signals.valid()
        official = dual_attention_keep(signals.attention.unsqueeze(2), valid, 0.08, 0.09) | cls_key_set(signals.cls_attention, valid, 0.08)
        selection = record.selection  # positions in the image's original token coordinates
        cap = budget if number == 0 else None
        for b in range(2):
            kept = selection.row_indices(b)
            assert bool(selection.critical[b][selection.mask[b]].all())  # every kept token passed the rules
            # the drop's Signals hold the tokens still present, in order: map the official set back
            passed = present[b][official[b][: present[b].numel()]]
            if cap is None or passed.numel() <= cap:
                assert kept.tolist() == passed.tolist()  # the adaptive count: exactly the official set
            else:  # more pass than the cap: the cap's worth of them
                assert kept.numel() == cap and set(kept.tolist()) <= set(passed.tolist())
            assert int(selection.counts[b]) == kept.numel()
            official_counts.append(passed.numel())
            present[b] = kept
    assert 0 < min(official_counts) and any(c < budget for c in official_counts[:2])
    assert any(c < 16 for c in official_counts[2:])  # later drops prune further, below the first drop's count
    # decode policy final: every step records hidden visual entries at layers >= 2
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3
    assert decode and all(r.layer == 2 for r in decode)


def test_mustdrop_budget_caps_the_official_count(model, inputs) -> None:
    pipeline = framework.compose("mustdrop", global_thr=0.08, individual_thr=0.09)
    with framework.prune(model, pipeline, budget=15) as handle, torch.no_grad():  # below the 16 tokens: not keep-all
        model(**inputs)
        free = handle.last_selection.drops[0].selection.counts
    with framework.prune(model, pipeline, budget=1) as handle, torch.no_grad():
        model(**inputs)
        capped = handle.last_selection.drops[0].selection.counts
    assert bool((free < 16).all()) and bool((free > 1).all())  # the official count, below the tokens
    assert capped.tolist() == [1, 1]


def test_mustdrop_vision_values_are_the_local_merge(model, inputs) -> None:
    spy = SignalRecorder(framework.compose("mustdrop_vision"))
    grid_tokens = 16  # tiny CLIP: 28 px / 7 px patches = 4 x 4, one full 3x3 window
    budget = grid_tokens - 8  # merges that window completely: the official rule at any threshold it passes
    with framework.prune(model, spy, budget=budget) as handle, torch.no_grad():
        logits = model(**inputs).logits
        result = handle.last_selection
    assert torch.isfinite(logits).all()
    signals = spy.seen[-1]
    assert signals.row_grids() == [(4, 4), (4, 4)]
    valid = signals.valid()
    want = local_merge(signals.visual, signals.row_grids(), valid, threshold=-1.0)
    exact = local_merge_to_count(signals.visual, signals.row_grids(), torch.full((2,), budget), valid)
    assert torch.equal(want.keep, exact.keep)
    selection = result.drops[0].selection
    assert selection.counts.tolist() == [budget, budget]
    for b in range(2):
        kept = want.keep[b].nonzero().flatten()
        assert selection.row_indices(b).tolist() == kept.tolist()
        torch.testing.assert_close(selection.values[b][selection.mask[b]].float(), want.values[b, kept].float(), atol=1e-6, rtol=0)
    # the merged window stands at its bottom-right token (position 10 of the 4x4 grid), as the window mean
    window = torch.tensor([0, 1, 2, 4, 5, 6, 8, 9, 10])
    torch.testing.assert_close(want.values[0, 10].float(), signals.visual[0, window].float().mean(0), atol=1e-6, rtol=0)
