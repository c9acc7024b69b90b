"""PruneVid end to end on the tiny LLaVA-OneVision with video inputs (two scenes of still frames, so segments,
static tokens and merging all happen): the prefill's first drop keeps exactly the reference merge of the model's
own video features (tests/helpers/prunevid_reference.py) with its merged values (newline kept); the second drop
keeps what the official ``process_attention`` keeps (``int(size * alpha)`` of each static / dynamic group of the
reference merge, by the max over heads and prompt rows of the reference model's own eager attention at layer k - 1;
the newline kept); the pruned forward and ``generate`` equal the unpruned model fed the merged values and masked as
the drops remove; batch == each sample alone."""

from __future__ import annotations

import math

import pytest
import torch
from adapter_fixtures import (
    aligned,
    generation_positions,
    llava_onevision_inputs,
    masked_reference,
    merged_embeddings,
    removed_by_layer,
    tiny_llava_onevision,
)
from prunevid_reference import ref_merge_video, ref_process_attention

from vtprune.framework.prune import prune

FRAMES = 6
VIDEO = ((("video",),), (("video",),))
K = 2
RECIPE = f"prunevid+diversity.prunevid(segment_ratio=0.5)+prunevid_layer(k={K},alpha=0.4)"  # score=official
MODEL_SCORE = f"prunevid+diversity.prunevid(segment_ratio=0.5)+prunevid_layer(k={K},alpha=0.4,score=model)"


def _plain_attention(layer, hidden: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(B, H, L, L): official PruneVid ``attn_weights_wo_pos``: softmax(q k^T / sqrt(d)) of the layer's projections of
    its normed input ``hidden`` (B, L, D), before RoPE, over the keys ``keys`` (B, L) bool (no causal mask)."""
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    batch, length, _ = normed.shape
    d = attn.head_dim
    q = attn.q_proj(normed).view(batch, length, -1, d).transpose(1, 2)  # (B, H, L, d)
    k = attn.k_proj(normed).view(batch, length, -1, d).transpose(1, 2)  # (B, Hk, L, d)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, L, d)
    logits = (q @ k.transpose(2, 3)) / math.sqrt(d)  # (B, H, L, L)
    logits = logits.masked_fill(~keys[:, None, None, :], float("-inf"))
    return torch.softmax(logits.float(), dim=-1)


def _setup():
    model = tiny_llava_onevision(attn="eager")  # the reference reads the model's own attention weights
    inputs = llava_onevision_inputs(model, VIDEO, question_lengths=(3, 6), frames=FRAMES)
    videos = inputs["pixel_values_videos"]  # (B, T, 3, S, S)
    noise = torch.randn(videos.shape, generator=torch.Generator().manual_seed(5)) * 0.02
    videos = torch.cat([videos[:, :1].expand(-1, 3, -1, -1, -1), videos[:, 3:4].expand(-1, FRAMES - 3, -1, -1, -1)], dim=1)
    inputs["pixel_values_videos"] = (videos + noise).contiguous()
    with torch.no_grad():
        features = list(model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output)  # (T*P + 1, D)
    return model, inputs, features


@pytest.mark.parametrize("recipe", [RECIPE, MODEL_SCORE])
def test_drops_keep_the_reference_merge_and_forward_generate_equal_the_merged_masked_reference(recipe):
    model, inputs, features = _setup()
    batch, length = inputs["input_ids"].shape
    feed = {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}
    with prune(model, recipe, budget=1.0, positions="keep") as handle:
        with torch.no_grad():
            out = model(**feed).logits
        result = handle.last_selection
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    first, second = result.drops
    assert (second.where, second.layer) == ("layer", K)
    per_frame = (features[0].shape[0] - 1) // FRAMES
    embeds = merged_embeddings(model, inputs)
    all_groups = []
    for row, video in enumerate(features):
        tokens = video[:-1].view(FRAMES, per_frame, -1)
        segments, groups = ref_merge_video(tokens.double(), 0.8, 0.5, 0.5, torch.Generator().manual_seed(0))
        assert sum(len(g) for g in groups) < FRAMES * per_frame  # static tokens merged over their segment
        all_groups.append(groups)
        expected = {p: v for members in groups for p, v in members} | {video.shape[0] - 1: video[-1].tolist()}
        kept = first.selection.row_indices(row).tolist()
        assert kept == sorted(expected)
        slots = first.selection.mask[row]
        for slot, p in enumerate(kept):
            torch.testing.assert_close(first.selection.values[row][slots][slot], torch.tensor(expected[p]), atol=1e-5, rtol=0)
        positions = result.image_positions[row]
        b = int(result.image_sample[row])
        for slot, p in enumerate(kept):
            embeds[b, positions[p]] = first.selection.values[row][slots][slot]
    removed = removed_by_layer(result, batch, length, model.config.text_config.num_hidden_layers)
    reference_feed = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"], "position_ids": feed["position_ids"]}
    layer = model.model.language_model.layers[K - 1]
    entering = []
    handle = layer.register_forward_pre_hook(lambda module, args, kwargs: entering.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        with torch.no_grad(), masked_reference(model, removed):
            ref_out = model(**reference_feed, output_attentions=True)
            reference = ref_out.logits
            ref_gen = model.generate(**reference_feed, max_new_tokens=6, do_sample=False)
    finally:
        handle.remove()
    # official process_attention at layer K - 1 (its input: the merged tokens, the first drop's removed tokens gone):
    # max over heads, then over the prompt rows (every token after the video), int(size * alpha) of each group of the
    # official merge; the newline stays. Score: score=official, the layer's softmax(q k^T / sqrt(d)) before RoPE over
    # every present token (independently recomputed here); score=model, the model's own eager attention weights
    if recipe == RECIPE:
        with torch.no_grad():
            weights = _plain_attention(layer, entering[0], inputs["attention_mask"].bool() & ~removed[K - 1])
    else:
        weights = ref_out.attentions[K - 1]  # (B, H, L, L)
    for row, groups in enumerate(all_groups):
        b, positions = int(result.image_sample[row]), result.image_positions[row]
        real = torch.nonzero(inputs["attention_mask"][b]).flatten()
        prompt = real[real > positions[-1]]  # (T,)
        score = weights[b][:, prompt][:, :, positions].amax(dim=0).amax(dim=0)  # (n,) per image token
        order = [p for members in groups for p in sorted(p for p, _ in members)]
        laid = [float(score[p]) for p in order]
        keep = [order[i] for i in ref_process_attention(laid, [len(m) for m in groups], 0.4)]
        expected = sorted(keep + [positions.numel() - 1])  # + the newline
        assert second.selection.row_indices(row).tolist() == expected
    got, want = aligned(out, result, reference, inputs["attention_mask"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.equal(generated[:, length:], ref_gen[:, -6:])


def test_batch_equals_each_sample_alone():
    model, inputs, _ = _setup()
    offset = inputs["input_ids"].shape[1]
    with prune(model, RECIPE, budget=1.0) as handle:
        batch = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        batch_kept = [handle.last_selection.drops[1].selection.row_indices(r).tolist() for r in range(2)]
        for b in range(2):
            real = inputs["attention_mask"][b].bool()
            sample = {
                "input_ids": inputs["input_ids"][b : b + 1, real],
                "attention_mask": inputs["attention_mask"][b : b + 1, real],
                "pixel_values_videos": inputs["pixel_values_videos"][b : b + 1],
            }
            alone = model.generate(**sample, max_new_tokens=4, do_sample=False)
            assert torch.equal(batch[b, offset:], alone[0, sample["input_ids"].shape[1] :])
            assert handle.last_selection.drops[1].selection.row_indices(0).tolist() == batch_kept[b]


def test_official_and_model_scores_keep_different_tokens():
    """The two scores are not interchangeable on this input (so the test above tells them apart): the official
    pre-RoPE, non-causal score keeps other tokens than the model's own attention in at least one row."""
    model, inputs, _ = _setup()
    kept = {}
    for recipe in (RECIPE, MODEL_SCORE):
        with prune(model, recipe, budget=1.0) as handle:
            with torch.no_grad():
                model(**inputs)
            kept[recipe] = [handle.last_selection.drops[1].selection.row_indices(r).tolist() for r in range(2)]
    assert kept[RECIPE] != kept[MODEL_SCORE]


def test_second_drop_sees_the_groups_of_the_first_as_frame_spans(monkeypatch):
    """``Signals.frame_span`` at the second drop, as the adapter fills it from the first drop's assignment: each
    static token of the reference merge stands for every frame of its segment, each dynamic token for its frame, the
    newline for none."""
    from vtprune.strategies.prunevid import PruneVidGroups

    model, inputs, features = _setup()
    seen = []
    original = PruneVidGroups.supplement

    def supplement(stage, signals, *args):
        seen.append(signals.frame_span.clone())
        return original(stage, signals, *args)

    monkeypatch.setattr(PruneVidGroups, "supplement", supplement)
    with prune(model, RECIPE, budget=1.0) as handle:
        with torch.no_grad():
            model(**inputs)
        result = handle.last_selection
    assert len(seen) == 1
    per_frame = (features[0].shape[0] - 1) // FRAMES
    for row, video in enumerate(features):
        segments, groups = ref_merge_video(video[:-1].view(FRAMES, per_frame, -1).double(), 0.8, 0.5, 0.5,
                                           torch.Generator().manual_seed(0))
        expected, g, start = {video.shape[0] - 1: (-1, -1)}, 0, 0
        for width in segments:
            expected |= {p: (start, start + width - 1) for p, _ in groups[g]}  # the segment's static tokens
            for t in range(width):
                expected |= {p: (start + t, start + t) for p, _ in groups[g + 1 + t]}  # frame t's dynamic tokens
            g, start = g + 1 + width, start + width
        kept = result.drops[0].selection.row_indices(row).tolist()
        assert kept == sorted(expected)
        assert [tuple(s) for s in seen[0][row, : len(kept)].tolist()] == [expected[p] for p in kept]
        assert any(first < last for first, last in expected.values())  # static tokens spanning several frames
