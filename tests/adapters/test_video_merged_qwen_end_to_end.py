"""FastVID, HoliTom and PruneVid end to end on a tiny Qwen2.5-VL video (M-RoPE, merged 2x2 units as tokens, the
adapter fills ``Signals.frames``), two scenes of still frames per video, against the merged / masked reference:

- the drop before the LLM keeps exactly the loop-style reference of the official method computed from the model's
  own video features (tests/helpers/density_video_reference.py, tests/helpers/prunevid_reference.py), with its
  merged values;
- HoliTom's inner merge at layer k keeps the tokens the reference model's own hook merges (eager attention of the
  last position at layer k-1, tests/helpers/video_merge_reference.py); PruneVid's in-LLM drop keeps
  ``int(n * alpha)`` of the merged tokens;
- the pruned logits equal, within 1e-5, the unpruned model (same M-RoPE ids) fed the merged values at the kept
  slots with the dropped tokens masked out; greedy ``generate`` equals the reference's greedy loop; a left-padded
  batch equals each sample alone.
"""

from __future__ import annotations

import pytest
import torch
from adapter_fixtures import single_thread
from density_video_reference import ref_fastvid, ref_holitom
from prunevid_reference import ref_merge_video
from qwen_fixtures import MaskedReference, Sample, aligned, batch, drop_masks, logits, tiny_qwen
from video_merge_reference import EmbedsOverride, InnerMerge, plain_frame_attention

from vtprune.framework.prune import prune

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)

FRAMES, H, W = 6, 2, 3
PER_FRAME = H * W
SAMPLES = [
    Sample(images=(), videos=((FRAMES, H, W),), question=(20, 21), seed=3),
    Sample(images=(), videos=((FRAMES, H, W),), question=(22, 23, 24, 25), seed=4),
]
K = 2
STEPS = 5
FASTVID = "fastvid+diversity.fastvid(c=2,tau=0.9,d=0.4,p=2,beta=0.6,seed=0)"
HOLITOM = f"holitom+pre_llm_layer(k={K},keep=0.5)"
PRUNEVID = f"prunevid+diversity.prunevid(segment_ratio=0.34)+prunevid_layer(k={K},alpha=0.4)"
# of 36 tokens per video: FastVID ratio 1/2 retains 3 per frame (2 salient, 1 density anchor); HoliTom ratio 1/4;
# PruneVid keeps its own count (budget 1.0)
BUDGET = {FASTVID: 18, HOLITOM: 9, PRUNEVID: 1.0}


def _still_scenes(inputs: dict, seeds) -> dict:
    """Each video's frames 1-2 repeat frame 0 and frames 4-5 repeat frame 3 (plus small noise): the patch rows of a
    Qwen video are temporal-patch-major, one block of ``h * w * merge^2`` rows per temporal patch. The noise of
    each video comes from its own ``seeds`` entry (the same alone and in a batch)."""
    pixels = inputs["pixel_values_videos"].clone()
    start = 0
    for (t, h, w), seed in zip(inputs["video_grid_thw"].tolist(), seeds):
        generator = torch.Generator().manual_seed(seed)
        block = h * w
        frames = pixels[start : start + t * block].view(t, block, -1)  # (T, rows, C)
        scenes = torch.cat([frames[:1].expand(3, -1, -1), frames[3:4].expand(t - 3, -1, -1)])
        noise = torch.randn(scenes.shape, generator=generator) * 0.02
        pixels[start : start + t * block] = (scenes + noise).reshape(t * block, -1)
        start += t * block
    return {**inputs, "pixel_values_videos": pixels}


def _inputs(samples):
    inputs, layouts = batch(samples)
    return _still_scenes(inputs, [100 + s.seed for s in samples for _ in s.videos]), layouts


def _official(recipe: str, video: torch.Tensor) -> dict[int, torch.Tensor]:
    """{row position: value} the reference keeps of one video row (T * h * w tokens)."""
    tokens = video.view(FRAMES, PER_FRAME, -1)  # (T, n, D)
    if recipe == PRUNEVID:
        _, groups = ref_merge_video(tokens.double(), 0.8, 0.5, 0.34, torch.Generator().manual_seed(0))
        return {p: torch.tensor(v) for members in groups for p, v in members}
    ratio = BUDGET[recipe] / video.shape[0]
    salience = plain_frame_attention(tokens)  # (T, n)
    if recipe == FASTVID:
        kept = ref_fastvid(tokens, salience, tokens.float().mean(dim=1), ratio, c=2, tau=0.9, d=0.4, p=2, beta=0.6,
                           gen=torch.Generator().manual_seed(0))
    else:
        kept, _ = ref_holitom(tokens, salience, ratio, tau=0.8, beta=0.6, gen=torch.Generator().manual_seed(0))
    return {t * PER_FRAME + s: v for (t, s), v in kept.items()}


@pytest.mark.parametrize("recipe", [FASTVID, HOLITOM, PRUNEVID])
def test_forward_and_generate_equal_the_merged_masked_reference(recipe):
    model = tiny_qwen("qwen2_5_vl", attn="eager", layers=4)
    inputs, layouts = _inputs(SAMPLES)
    length = inputs["input_ids"].shape[1]
    with prune(model, recipe, budget=BUDGET[recipe]) as handle:
        pruned = logits(model, inputs)
        result = handle.last_selection
        generated = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)[:, length:]
    with torch.no_grad():
        out = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    videos = list(out.pooler_output if hasattr(out, "pooler_output") else out)
    first = result.drops[0]
    assert first.where == "pre_llm" and len(result.image_positions) == len(videos)
    writes, values, present = [], [], []
    for row, video in enumerate(videos):
        positions = result.image_positions[row]
        b = int(result.image_sample[row])
        assert positions.tolist() == layouts[b][0][1]
        expected = _official(recipe, video)
        kept = first.selection.row_indices(row).tolist()
        assert kept == sorted(expected) and len(kept) < video.shape[0]
        assert any(not torch.allclose(expected[p].float(), video[p].float()) for p in kept)  # some values are merged
        got = first.selection.values[row][first.selection.mask[row]]
        for slot, p in enumerate(kept):
            torch.testing.assert_close(got[slot], expected[p].float(), atol=1e-5, rtol=0)
            writes.append((b, int(positions[p])))
            values.append(expected[p])
        present.append((b, positions[kept]))
    masks = drop_masks(result, inputs)
    keep = masks[-1][1]
    later = masks[1:]

    def reference():
        return MaskedReference(model, inputs, masks[0][1], masks[0][0], later=later)

    # the query token: the sequence's last token (official HoliTom ``[0, -1]``, after "<|im_start|>assistant\n"),
    # not the last prompt token (the question's last, before "<|im_end|>")
    inner = InnerMerge(model, K, present, 0.5, length) if recipe == HOLITOM else None
    with EmbedsOverride(model, length, writes, values):
        if inner is None:
            want = reference().logits()
            tokens, _ = reference().generate(STEPS)
        else:
            with inner:
                want = reference().logits()
                kept_inner = [list(k) for k in inner.kept]
                tokens, _ = reference().generate(STEPS)
    if recipe != FASTVID:
        second = result.drops[1]
        assert (second.where, second.layer) == ("layer", K)
        for row, (b, before) in enumerate(present):
            positions = result.image_positions[row]
            now = positions[second.selection.row_indices(row)].tolist()
            if inner is not None:
                assert now == kept_inner[row]
                got = second.selection.values[row][second.selection.mask[row]]
                for slot, p in enumerate(now):
                    torch.testing.assert_close(got[slot], inner.merged[row][p].float(), atol=1e-5, rtol=0)
            else:
                assert len(now) == int(before.numel() * 0.4) and set(now) <= set(before.tolist())
    ours, theirs = aligned(pruned, want, keep)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert torch.equal(generated, tokens)


@pytest.mark.parametrize("recipe", [FASTVID, HOLITOM, PRUNEVID])
def test_batch_equals_each_sample_alone(recipe):
    model = tiny_qwen("qwen2_5_vl", layers=4)
    inputs, _ = _inputs(SAMPLES)
    length = inputs["input_ids"].shape[1]
    with prune(model, recipe, budget=BUDGET[recipe]) as handle:
        together = logits(model, inputs)[:, -1]
        kept = [[d.selection.row_indices(r).tolist() for d in handle.last_selection.drops] for r in range(2)]
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, length:]
        for b, sample in enumerate(SAMPLES):
            alone, _ = _inputs([sample])
            torch.testing.assert_close(logits(model, alone)[:, -1], together[b : b + 1], atol=1e-5, rtol=0)
            assert [d.selection.row_indices(0).tolist() for d in handle.last_selection.drops] == kept[b]
            tokens = model.generate(**alone, max_new_tokens=4, do_sample=False)[:, alone["input_ids"].shape[1] :]
            assert torch.equal(tokens, generated[b : b + 1])
