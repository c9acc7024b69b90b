"""FastVID / HoliTom end to end on the tiny LLaVA-OneVision with video inputs: the presets attach, prune the
video tokens (HoliTom: before the LLM, then the inner merge at layer k), ``generate`` runs and is repeatable.
Frames come from the adapter where it fills ``Signals.frames``; otherwise each video row is one frame
(the documented fallback)."""

from __future__ import annotations

import pytest
import torch
from adapter_fixtures import llava_onevision_inputs, tiny_llava_onevision

from vtprune.framework import prune

VIDEO = ((("video",),), (("video",),))


@pytest.fixture(scope="module")
def model():
    return tiny_llava_onevision()


@pytest.mark.parametrize("recipe,params", [("fastvid", {}), ("holitom", {"k": 2})])
def test_video_presets_generate(model, recipe, params):
    inputs = llava_onevision_inputs(model, VIDEO, question_lengths=(3, 6), batch_num_images=False, seed=1)
    outputs, counts = [], []
    for _ in range(2):
        handle = prune(model, recipe, 0.5, **params)
        try:
            with torch.no_grad():
                outputs.append(model.generate(**inputs, max_new_tokens=3, do_sample=False))
            result = handle.last_selection
            counts.append(result.counts.tolist())
        finally:
            handle.remove()
    assert torch.equal(outputs[0], outputs[1])
    assert counts[0] == counts[1] and all(c > 0 for c in counts[0])


@pytest.mark.parametrize("recipe,params", [("fastvid", {}), ("holitom", {"k": 2})])
def test_video_presets_on_qwen2_5_vl_batch_equals_alone(recipe, params):
    """Qwen2.5-VL video rows (the adapter fills ``frames``): the presets prune, ``generate`` is repeatable, and each
    sample gives the same last-token logits and greedy tokens alone as in the left-padded batch."""
    from qwen_fixtures import TOL, WITH_VIDEO, batch, logits, tiny_qwen

    model = tiny_qwen("qwen2_5_vl")
    samples = [s for s in WITH_VIDEO if s.videos]
    inputs, _ = batch(samples)
    length = inputs["input_ids"].shape[1]
    with prune(model, recipe, 0.5, **params) as handle, torch.no_grad():
        together = logits(model, inputs)[:, -1]
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, length:]
        again = model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, length:]
        counts = handle.last_selection.counts
        assert torch.equal(generated, again)
        assert bool((counts > 0).all())
        for b, sample in enumerate(samples):
            alone, _ = batch([sample])
            torch.testing.assert_close(logits(model, alone)[:, -1], together[b : b + 1], atol=TOL, rtol=0)
            tokens = model.generate(**alone, max_new_tokens=3, do_sample=False)[:, alone["input_ids"].shape[1] :]
            assert torch.equal(tokens, generated[b : b + 1])
