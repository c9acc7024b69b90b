"""FastVID and HoliTom end to end on the tiny LLaVA-OneVision with video inputs (two scenes of still frames, so
segments, static tokens and merging all happen), against the merged / masked reference:

- the drop before the LLM keeps exactly the loop-style reference of the official method
  (tests/helpers/density_video_reference.py) computed from the model's own video features, with its merged values
  (the video's newline kept as it is);
- HoliTom's inner merge at layer k keeps the reference's tokens: the reference model (eager attention) takes the
  last position's head-mean attention at layer k-1 and merges the hidden states entering layer k in a hook of its
  own (tests/helpers/video_merge_reference.py), independently of the library's hooks;
- the pruned forward's logits equal, within 1e-5, the unpruned model fed the merged values at the kept slots
  (positions as in the unpruned sequence) with the dropped tokens masked out; greedy ``generate`` equals the
  reference's greedy tokens; a left-padded batch equals each sample alone.
"""

from __future__ import annotations

import pytest
import torch
from adapter_fixtures import (
    aligned,
    generation_positions,
    masked_reference,
    merged_embeddings,
    removed_by_layer,
    single_thread,
    two_scene_video_inputs,
)
from density_video_reference import ref_fastvid, ref_holitom
from video_merge_reference import InnerMerge, plain_frame_attention

from vtprune.framework.prune import prune

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)

FRAMES = 6
K = 2  # HoliTom's inner-merge layer
STEPS = 6
FASTVID = "fastvid+diversity.fastvid(c=2,tau=0.9,d=0.4,p=2,beta=0.6,seed=0)"
HOLITOM = f"holitom+pre_llm_layer(k={K},keep=0.5)"
# of 25 tokens per video row (6 frames x 2 x 2 + the newline). FastVID: ratio 19 / 25 retains int(4 r) = 3 per frame,
# 2 salient and 1 density anchor (merging); HoliTom: ratio 12 / 25 (static tokens merged over their window)
BUDGET = {FASTVID: 19, HOLITOM: 12}


def _setup():
    model, inputs = two_scene_video_inputs((3, 6), FRAMES)
    with torch.no_grad():
        features = list(model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output)  # (T*P + 1, D)
    return model, inputs, features


def _official(recipe: str, video: torch.Tensor) -> dict[int, torch.Tensor]:
    """{row position: value} the reference keeps of one LLaVA-OneVision video row (T*P frame tokens + newline)."""
    per_frame = (video.shape[0] - 1) // FRAMES
    tokens = video[:-1].view(FRAMES, per_frame, -1)  # (T, P, D)
    ratio = BUDGET[recipe] / video.shape[0]
    salience = plain_frame_attention(tokens)  # (T, P)
    if recipe == FASTVID:
        kept = ref_fastvid(tokens, salience, tokens.float().mean(dim=1), ratio, c=2, tau=0.9, d=0.4, p=2, beta=0.6,
                           gen=torch.Generator().manual_seed(0))
    else:
        kept, _ = ref_holitom(tokens, salience, ratio, tau=0.8, beta=0.6, gen=torch.Generator().manual_seed(0))
    out = {t * per_frame + s: v for (t, s), v in kept.items()}
    out[video.shape[0] - 1] = video[-1]  # the newline, kept as it is
    return out


@pytest.mark.parametrize("recipe", [FASTVID, HOLITOM])
def test_forward_and_generate_equal_the_merged_masked_reference(recipe):
    model, inputs, features = _setup()
    batch, length = inputs["input_ids"].shape
    feed = {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}
    with prune(model, recipe, budget=BUDGET[recipe], positions="keep") as handle:
        with torch.no_grad():
            out = model(**feed).logits
        result = handle.last_selection
        generated = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    first = result.drops[0]
    assert first.where == "pre_llm"
    embeds = merged_embeddings(model, inputs)
    present = []
    for row, video in enumerate(features):
        expected = _official(recipe, video)
        kept = first.selection.row_indices(row).tolist()
        assert kept == sorted(expected)
        assert len(kept) < video.shape[0]  # merged / pruned
        assert any(not torch.allclose(expected[p].float(), video[p].float()) for p in kept)  # some values are merged
        values = first.selection.values[row][first.selection.mask[row]]
        positions = result.image_positions[row]
        b = int(result.image_sample[row])
        for slot, p in enumerate(kept):
            torch.testing.assert_close(values[slot], expected[p].float(), atol=1e-5, rtol=0)
            embeds[b, positions[p]] = expected[p]
        present.append((b, positions[kept]))
    removed = removed_by_layer(result, batch, length, model.config.text_config.num_hidden_layers)
    reference_feed = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"], "position_ids": feed["position_ids"]}
    inner = InnerMerge(model, K, present, 0.5, length) if recipe == HOLITOM else None
    with torch.no_grad(), masked_reference(model, removed):
        if inner is None:
            reference = model(**reference_feed).logits
            ref_gen = model.generate(**reference_feed, max_new_tokens=STEPS, do_sample=False)
        else:
            with inner:
                reference = model(**reference_feed).logits
                kept_inner = [list(k) for k in inner.kept]
                ref_gen = model.generate(**reference_feed, max_new_tokens=STEPS, do_sample=False)
    if inner is not None:
        second = result.drops[1]
        assert (second.where, second.layer) == ("layer", K)
        for row, (b, _) in enumerate(present):
            positions = result.image_positions[row]
            assert positions[second.selection.row_indices(row)].tolist() == kept_inner[row]
            values = second.selection.values[row][second.selection.mask[row]]
            for slot, p in enumerate(kept_inner[row]):
                torch.testing.assert_close(values[slot], inner.merged[row][p].float(), atol=1e-5, rtol=0)
    got, want = aligned(out, result, reference, inputs["attention_mask"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.equal(generated[:, length:], ref_gen[:, -STEPS:])


@pytest.mark.parametrize("recipe", [FASTVID, HOLITOM])
def test_batch_equals_each_sample_alone(recipe):
    model, inputs, _ = _setup()
    offset = inputs["input_ids"].shape[1]
    with prune(model, recipe, budget=BUDGET[recipe]) as handle:
        batch = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        batch_kept = [[d.selection.row_indices(r).tolist() for d in handle.last_selection.drops] for r in range(2)]
        for b in range(2):
            real = inputs["attention_mask"][b].bool()
            sample = {
                "input_ids": inputs["input_ids"][b : b + 1, real],
                "attention_mask": inputs["attention_mask"][b : b + 1, real],
                "pixel_values_videos": inputs["pixel_values_videos"][b : b + 1],
            }
            alone = model.generate(**sample, max_new_tokens=4, do_sample=False)
            assert torch.equal(batch[b, offset:], alone[0, sample["input_ids"].shape[1] :])
            assert [d.selection.row_indices(0).tolist() for d in handle.last_selection.drops] == batch_kept[b]
