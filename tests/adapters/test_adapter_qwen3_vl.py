"""Qwen3-VL adapter against independent references (tiny random model, CPU, fp32, one thread).

DeepStack: the unpruned model adds the i-th DeepStack features to every visual token after decoder layer i. The
references are written without the adapter: the unpruned model with the dropped tokens masked out of attention
in the affected layers (same M-RoPE ids from ``get_rope_index``). Masking does not stop DeepStack from adding
features to the dropped tokens' own hidden states, but nobody attends to them, so the logits of the kept tokens
must equal the pruned model's, where a kept token receives exactly its own features and a dropped one is gone.
``compact`` at ``pre_llm``: the text model fed only the kept tokens as embeddings together with their own
DeepStack rows (``visual_pos_masks`` / ``deepstack_visual_embeds`` built here from the model's own
``get_image_features`` / ``get_video_features``). Tolerance: 1e-5 absolute on logits.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from adapter_fixtures import NeedsCls, single_thread
from family_checks import (
    check_base_model_matches,
    check_docstring_examples,
    check_keep_all_every_placement,
    check_text_only_untouched,
)
from qwen_fixtures import (
    CHANNELS, END, IMAGE, MERGE, MIXED, PATCH, PRE_LLM, SCHEDULE, TEMPORAL, TOKEN_IDS, TOL, TURN, VIDEO, VISION,
    WITH_VIDEO, MaskedReference, Recording, Sample, aligned, build, check_batch_equals_each_sample_alone,
    check_compact_positions, check_generate, check_generate_compact, check_keep_positions, check_manual_decoding,
    check_merge_units, check_own_values_go_through_the_merger, check_schedule_keep, check_sdpa_equals_eager,
    kept_mask, logits, rope_positions, text_config,
)
from qwen_fixtures import batch as qwen_batch
from vtprune.adapters.qwen3_vl import DeepstackFeed, Qwen3VLAdapter, find_visual_items, refine_item
from vtprune.framework import MissingSignalError, VtpruneError, compose, prune

DEEPSTACK = [0, 1]  # vision blocks whose merged features are added after decoder layers 0 and 1

LAYER_IN = "attention+critical+diversity.none+split+layer(k=1)"  # deepstack after layer 1 sees the pruned sequence
LAYER_AFTER = "attention+critical+diversity.none+split+layer(k=2)"  # after every deepstack layer

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)

#: Left-padded inputs with videos written as Qwen3-VL's processor writes them: ``<|vision_start|>``, then per
#: frame a timestamp, ``<|vision_start|>``, h * w placeholders, ``<|vision_end|>``, then ``<|vision_end|>``.
batch = partial(qwen_batch, timestamps=True)


# ------------------------------------------------------------------------------------------------
# Tiny model
# ------------------------------------------------------------------------------------------------


def tiny_qwen3(attn: str = "sdpa", seed: int = 0, layers: int = 3):
    """A random ``Qwen3VLForConditionalGeneration``: text 4 heads (GQA 4/2) of 8 dims, q/k norms, interleaved
    M-RoPE sections (2, 1, 1); vision 2 blocks of width 16, a 4 x 4 learned position grid, DeepStack on both
    blocks (added after decoder layers 0 and 1)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = text_config(layers, interleaved=True, head_dim=8)
    vision = dict(
        depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, num_position_embeddings=16,
        deepstack_visual_indexes=DEEPSTACK, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
        in_channels=CHANNELS,
    )
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **TOKEN_IDS)
    return build(Qwen3VLForConditionalGeneration, config, attn, seed)


# ------------------------------------------------------------------------------------------------
# Independent references (the masked one: `qwen_fixtures.MaskedReference`)
# ------------------------------------------------------------------------------------------------


def vision_inputs(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """What ``Qwen3VLModel.forward`` hands its text model, rebuilt from the model's public feature methods:
    the merged embeddings (B, L, D), the visual mask (B, L) and one (n_visual, D) DeepStack tensor per layer
    (rows in row-major order of the mask)."""
    ids = inputs["input_ids"]
    vlm = model.model
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids).clone()
        visual = (ids == IMAGE) | (ids == VIDEO)
        deepstack = [torch.zeros(int(visual.sum()), embeds.shape[-1]) for _ in DEEPSTACK]
        rank = visual.flatten().long().cumsum(0).view_as(visual) - 1
        kinds = ((IMAGE, "pixel_values", "image_grid_thw"), (VIDEO, "pixel_values_videos", "video_grid_thw"))
        for token, pixels, grid in kinds:
            if pixels not in inputs:
                continue
            get = vlm.get_image_features if token == IMAGE else vlm.get_video_features
            out = get(inputs[pixels], inputs[grid])
            embeds[ids == token] = torch.cat(out.pooler_output)
            for layer, features in enumerate(out.deepstack_features):
                deepstack[layer][rank[ids == token]] = torch.cat(features)
    return embeds, visual, deepstack


def compact_reference(model, inputs: dict, keep: torch.Tensor, steps: int = 0) -> torch.Tensor:
    """The text model fed only the kept tokens of one unpadded sample, each visual one with its own DeepStack
    rows (positions 0..K-1, the text model's default): logits (1, K, V), or the logits of ``steps`` greedy steps."""
    assert keep.shape[0] == 1 and bool(inputs["attention_mask"].all())
    embeds, visual, deepstack = vision_inputs(model, inputs)
    rank = visual.flatten().long().cumsum(0).view_as(visual) - 1
    rows = rank[keep & visual]
    kept = embeds[keep].unsqueeze(0)
    mask = (visual & keep)[keep].unsqueeze(0)
    stack = model.model.language_model
    with torch.no_grad():
        out = stack(inputs_embeds=kept, visual_pos_masks=mask, deepstack_visual_embeds=[d[rows] for d in deepstack],
                    use_cache=bool(steps))
        if not steps:
            return model.lm_head(out.last_hidden_state)
        scores = [model.lm_head(out.last_hidden_state[:, -1])]
        cache = out.cache
        for _ in range(1, steps):
            token = scores[-1].argmax(-1, keepdim=True)
            out = stack(inputs_embeds=model.get_input_embeddings()(token), cache=cache, use_cache=True)
            cache = out.cache
            scores.append(model.lm_head(out.last_hidden_state[:, -1]))
    return torch.stack(scores, 1)


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


def test_keep_all_is_bit_identical_for_every_placement_and_removal_restores_hooks():
    model = tiny_qwen3()
    inputs, _ = batch(WITH_VIDEO)
    recipes = (PRE_LLM, LAYER_IN, LAYER_AFTER, SCHEDULE.replace("ratio=0.5", "ratio=1.0"), VISION)
    check_keep_all_every_placement(model, inputs, recipes, Qwen3VLAdapter, [6, 9, 2, 3, 8], logits)


@pytest.mark.parametrize(
    "recipe,from_layer",
    [(PRE_LLM, 0), (LAYER_IN, 1), (LAYER_AFTER, 2), (VISION, 0)],
    ids=["pre_llm", "layer1", "layer2", "vision"],
)
def test_keep_positions_match_masked_reference(recipe, from_layer):
    """Images of different sizes and counts and a timestamped video, left padded: every kept token's logits equal
    the unpruned model's with the dropped tokens masked out from ``from_layer`` on (DeepStack on in both)."""
    model = tiny_qwen3()
    inputs, layouts = batch(WITH_VIDEO)
    pruned, keep = check_keep_positions(model, inputs, layouts, recipe, from_layer, [3, 3, 2, 3, 3])
    if recipe == LAYER_IN:  # not vacuous: without DeepStack the kept tokens' logits are far off
        plain = MaskedReference(model, inputs, keep, from_layer, deepstack=False).logits()
        ours, theirs = aligned(pruned, plain, keep)
        assert (ours - theirs).abs().max() > 1e-3


def test_schedule_keep_matches_masked_reference():
    inputs, layouts = batch(WITH_VIDEO)
    check_schedule_keep(tiny_qwen3(), inputs, layouts, {1: [4, 4, 2, 3, 4], 2: [2, 2, 1, 2, 2]})


@pytest.mark.parametrize("recipe", [PRE_LLM, LAYER_IN], ids=["pre_llm", "layer1"])
def test_compact_positions(recipe):
    """pre_llm: equals the text model fed only the kept tokens with their own DeepStack rows; layer(1): the
    masked reference with rotary embeddings of 0..K-1 in layers >= 1."""
    inputs, layouts = batch([Sample(images=((3, 3),), videos=((2, 1, 2),), question=(20, 21, 22, 23))])
    check_compact_positions(tiny_qwen3(), inputs, layouts, recipe, 1, compact_reference)


@pytest.mark.parametrize(
    "recipe,from_layer,positions",
    [(PRE_LLM, 0, "keep"), (LAYER_IN, 1, "keep"), (LAYER_AFTER, 2, "compact"), (VISION, 0, "keep")],
    ids=["pre_llm", "layer1", "layer2-compact", "vision"],
)
def test_generate_matches_reference_and_cache_holds_kept_tokens(recipe, from_layer, positions):
    inputs, layouts = batch(WITH_VIDEO)
    check_generate(tiny_qwen3(), inputs, layouts, recipe, from_layer, positions)


def test_generate_compact_pre_llm_matches_kept_tokens_only():
    inputs, layouts = batch([Sample(images=((3, 3),), videos=((2, 1, 2),), question=(20, 21, 22, 23))])
    check_generate_compact(tiny_qwen3(), inputs, layouts, compact_reference)


@pytest.mark.parametrize(
    "recipe,positions", [(PRE_LLM, "keep"), (LAYER_IN, "keep"), (SCHEDULE, "compact"), (VISION, "keep")],
    ids=["pre_llm", "layer1", "schedule-compact", "vision"],
)
def test_left_padded_batch_equals_each_sample_alone(recipe, positions):
    """Image sizes, image counts, a video, left padding: each row as if alone (last-token logits, 4 greedy tokens)."""
    check_batch_equals_each_sample_alone(tiny_qwen3(), WITH_VIDEO, recipe, positions, timestamps=True)


@pytest.mark.parametrize(
    "recipe", [PRE_LLM, LAYER_IN, SCHEDULE, VISION], ids=["pre_llm", "layer1", "schedule", "vision"]
)
def test_sdpa_equals_eager(recipe):
    inputs, layouts = batch(WITH_VIDEO)
    check_sdpa_equals_eager(tiny_qwen3, inputs, layouts, recipe)


@pytest.mark.parametrize("recipe", [PRE_LLM, LAYER_IN], ids=["pre_llm", "layer1"])
def test_deepstack_feed_follows_the_segments(recipe):
    """What the text model receives. pre_llm: the mask over the compacted sequence and, per DeepStack layer,
    exactly the kept tokens' rows. layer(1): the model's own mask and features, a length cut at 1 once the drop
    has happened (the model adds layer 0's features itself), and for layer 1 the kept tokens' rows over the
    shortened sequence (added by the adapter). The model's own tensors are never modified; backward works."""
    model = tiny_qwen3()
    inputs, layouts = batch(MIXED)
    seen, original = {}, {}

    def spy(module, args, kwargs):  # runs after the adapter's hooks (registered later)
        seen["mask"], seen["feed"] = kwargs["visual_pos_masks"], kwargs["deepstack_visual_embeds"]

    def model_inputs(module, args, kwargs):  # what Qwen3VLModel passes, captured before any hook of the adapter
        original["mask"] = kwargs["visual_pos_masks"].clone()
        original["features"] = [f.clone() for f in kwargs["deepstack_visual_embeds"]]
        original["objects"] = (kwargs["visual_pos_masks"], list(kwargs["deepstack_visual_embeds"]))

    stack = model.model.language_model
    first = stack.register_forward_pre_hook(model_inputs, with_kwargs=True, prepend=True)
    with prune(model, recipe, budget=3) as handle:
        last = stack.register_forward_pre_hook(spy, with_kwargs=True)
        model(**inputs, use_cache=False).logits.square().sum().backward()  # autograd: nothing modified in place
        result = handle.last_selection
        last.remove()
    first.remove()
    assert model.model.visual.deepstack_merger_list[1].linear_fc2.weight.grad.abs().sum() > 0
    feed, (mask, features) = seen["feed"], original["objects"]
    assert isinstance(feed, DeepstackFeed)
    assert torch.equal(mask, original["mask"])
    assert all(torch.equal(a, b) for a, b in zip(features, original["features"]))
    keep = kept_mask(result, inputs, layouts)
    rows = keep[original["mask"]]  # kept visual tokens among the model's visual rows (row-major)
    index, valid = result.sequence_index, result.sequence_mask
    shortened = original["mask"].gather(1, index) & valid  # visual slots of the pruned sequence
    if recipe == PRE_LLM:
        assert len(feed) == len(DEEPSTACK) and torch.equal(seen["mask"], shortened)
        for layer in range(len(DEEPSTACK)):
            torch.testing.assert_close(feed[layer], features[layer][rows], atol=0, rtol=0)
            assert feed.after_layer(layer) is None
        return
    assert len(feed) == 1 and seen["mask"] is mask and feed[0] is features[0]
    with pytest.raises(RuntimeError, match="after a drop"):
        feed[1]
    slots, added = feed.after_layer(1)
    assert torch.equal(slots, shortened)
    torch.testing.assert_close(added, features[1][rows], atol=0, rtol=0)


def test_items_prompt_span_and_signals():
    """A video is one row over all its frames; the prompt span leaves out the frame timestamps."""
    model = tiny_qwen3()
    samples = [Sample(images=((2, 2),), videos=((3, 1, 2),), question=(20, 21), seed=3)]
    inputs, layouts = batch(samples)
    recording = Recording(compose(PRE_LLM))
    with prune(model, recording, budget=0.5) as handle:
        logits(model, inputs)
        result = handle.last_selection
    assert result.num_tokens.tolist() == [4, 6] and result.counts.tolist() == [2, 3]
    kept_mask(result, inputs, layouts)
    signals = recording.signals[-1]
    assert signals.prompt_mask.sum(1).tolist() == [2, 2]  # the question only: no timestamps, no vision tokens
    embed = model.get_input_embeddings().weight
    torch.testing.assert_close(signals.prompt[0, :2], embed[[20, 21]], atol=0, rtol=0)
    assert signals.grids.tolist() == [[2, 2], [0, 0]]  # the image's grid; a video has none

    ids = inputs["input_ids"]
    items = find_visual_items(ids, [(1, 2, 2)], [(3, 1, 2)], image_token_id=IMAGE, video_token_id=VIDEO)
    assert [list(item.positions()) for item in items] == [positions for _, positions, _ in layouts[0]]
    counted = find_visual_items(ids, [4], [6], image_token_id=IMAGE, video_token_id=VIDEO)  # generate: counts only
    assert [item.pieces for item in counted] == [item.pieces for item in items]
    refined = [refine_item(item, rope_positions(model, inputs)) for item in counted]
    assert [item.grid for item in refined] == [(1, 2, 2), (3, 1, 2)]
    in_generate = Recording(compose(PRE_LLM))
    with prune(model, in_generate, budget=0.5):
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert in_generate.signals[-1].grids.tolist() == [[2, 2], [0, 0]]
    assert in_generate.signals[-1].prompt_mask.sum(1).tolist() == [2, 2]
    with pytest.raises(ValueError):
        find_visual_items(ids, [(1, 2, 2)], [(2, 1, 3)], image_token_id=IMAGE, video_token_id=VIDEO)


def test_base_model_and_errors():
    """``Qwen3VLModel`` is supported too (same hidden states as the pruned full model); no CLS signals."""
    model = tiny_qwen3()
    inputs, _ = batch(MIXED)
    check_base_model_matches(model, inputs, LAYER_IN, 3, Qwen3VLAdapter, TOL, logits)

    needs_cls = NeedsCls(compose(PRE_LLM).placement)
    with pytest.raises(MissingSignalError, match="cls_attention"):
        prune(model, needs_cls, budget=3)
    with pytest.raises(MissingSignalError, match="Qwen3VLForConditionalGeneration.*cls_attention.*vision.*no CLS"):
        Qwen3VLAdapter.runtime(Qwen3VLAdapter(model), compose("visionzip"), 3)
    with pytest.raises(MissingSignalError, match="cls_attention.*placement 'vision'.*no CLS token"):
        prune(model, "visionzip", budget=3)
    with pytest.raises(VtpruneError, match="pre_llm_clip' \\(Qwen3-VL's tower is not a CLIP model"):
        prune(model, "cdpruner", budget=3, clip_model=object())
    ids = torch.tensor([[TURN, 5, 6, END, TURN, 20, 21, 22]])
    check_text_only_untouched(model, ids, LAYER_IN, 3, logits)  # text only: untouched


def test_vision_rows_are_merge_units_and_values_go_through_the_merger():
    model = tiny_qwen3()
    inputs, _ = batch(WITH_VIDEO)
    own = check_own_values_go_through_the_merger(model, inputs)
    check_merge_units(model, inputs, own.signals[-1], model.config.vision_config.hidden_size)


@pytest.mark.parametrize("positions", ["keep", "compact"])
def test_manual_decoding_without_position_ids_follows_rope_deltas(positions):
    """A hand-written decode loop (no position ids; with or without the unpruned-layout mask) gives the tokens
    ``generate`` gives."""
    inputs, _ = batch([Sample(images=((3, 3),), videos=((2, 1, 2),), question=(20, 21, 22))])
    check_manual_decoding(tiny_qwen3(), inputs, LAYER_IN, positions, steps=5)


@pytest.mark.parametrize("recipe", [PRE_LLM, LAYER_IN, VISION], ids=["pre_llm", "layer1", "vision"])
def test_bfloat16_model_runs(recipe):
    model = tiny_qwen3().to(torch.bfloat16)
    inputs, _ = batch(WITH_VIDEO)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    with prune(model, recipe, budget=3) as handle:
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert handle.last_selection.counts.tolist() == [3, 3, 2, 3, 3]
    assert out.shape == (len(WITH_VIDEO), inputs["input_ids"].shape[1] + 2)


def test_module_docstring_examples_run():
    import vtprune.adapters.qwen3_vl as module

    check_docstring_examples(module)


def test_video_rows_carry_their_frames():
    """frames = (grid_t, h / m, w / m) of each video, frame t's tokens = the model's own get_video_features rows of
    frame t; image rows (0, 0, 0); batch == alone."""
    from frame_checks import check_frames, check_frames_batch_equals_alone, grid_rows

    model = tiny_qwen3()
    samples = WITH_VIDEO + [Sample(images=(), videos=((3, 1, 2), (2, 2, 1)), question=(26, 27), seed=3)]
    inputs, layouts = batch(samples)
    check_frames(model, inputs, grid_rows(model, inputs, layouts), logits)
    check_frames_batch_equals_alone(model, inputs, [batch([s])[0] for s in samples], logits)
