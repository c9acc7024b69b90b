"""Qwen3-VL-MoE adapter against independent references (tiny random ``Qwen3VLMoeForConditionalGeneration``, CPU,
fp32, one thread): the Qwen3-VL proofs (``qwen_fixtures``) on a decoder whose MLPs are sparse MoE blocks
(4 experts, top-2 routing per token).

References are written without the adapter: the unpruned model with the dropped tokens masked out of attention
from the drop layer on (same M-RoPE ids from ``get_rope_index``; DeepStack features added as in the unpruned
model), and for ``compact`` at ``pre_llm`` the text model fed only the kept tokens with their own DeepStack rows.
Tolerance: 1e-5 absolute on logits.
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
)
from qwen_fixtures import (
    CHANNELS, IMAGE, MERGE, MIXED, PATCH, PRE_LLM, SCHEDULE, TEMPORAL, TOKEN_IDS, TOL, VIDEO, VISION, WITH_VIDEO,
    Sample, build, check_batch_equals_each_sample_alone, check_compact_positions,
    check_generate, check_generate_compact, check_keep_positions, check_merge_units,
    check_own_values_go_through_the_merger, check_schedule_keep, check_sdpa_equals_eager, logits,
    text_config,
)
from qwen_fixtures import batch as qwen_batch
from vtprune.adapters.qwen3_vl_moe import Qwen3VLMoeAdapter
from vtprune.framework import MissingSignalError, VtpruneError, compose, prune
from vtprune.testing import check_adapter

DEEPSTACK = [0, 1]  # vision blocks whose merged features are added after decoder layers 0 and 1
LAYER_IN = "attention+critical+diversity.none+split+layer(k=1)"  # DeepStack after layer 1 sees the pruned sequence
LAYER_AFTER = "attention+critical+diversity.none+split+layer(k=2)"

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)
batch = partial(qwen_batch, timestamps=True)


def tiny_moe(attn: str = "sdpa", seed: int = 0, layers: int = 3):
    """A random ``Qwen3VLMoeForConditionalGeneration``: text 4 heads (GQA 4/2) of 8 dims, q/k norms, interleaved
    M-RoPE (2, 1, 1), every layer a sparse MoE block of 4 experts (top 2); vision 2 blocks of width 16, DeepStack
    on both blocks."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    text = text_config(
        layers, interleaved=True, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        decoder_sparse_step=1,
    )
    vision = dict(
        depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, num_position_embeddings=16,
        deepstack_visual_indexes=DEEPSTACK, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
        in_channels=CHANNELS,
    )
    config = Qwen3VLMoeConfig(text_config=text, vision_config=vision, **TOKEN_IDS)
    return build(Qwen3VLMoeForConditionalGeneration, config, attn, seed)


def compact_reference(model, inputs: dict, keep: torch.Tensor, steps: int = 0) -> torch.Tensor:
    """The text model fed only the kept tokens of one unpadded sample, each visual one with its own DeepStack rows
    (rebuilt from the model's public ``get_image_features`` / ``get_video_features``; positions 0..K-1): logits
    (1, K, V), or the logits of ``steps`` greedy steps."""
    assert keep.shape[0] == 1 and bool(inputs["attention_mask"].all())
    ids, vlm = inputs["input_ids"], model.model
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids).clone()  # (1, L, D)
        visual = (ids == IMAGE) | (ids == VIDEO)  # (1, L)
        deepstack = [torch.zeros(int(visual.sum()), embeds.shape[-1]) for _ in DEEPSTACK]
        rank = visual.flatten().long().cumsum(0).view_as(visual) - 1
        for token, pixels, grid in ((IMAGE, "pixel_values", "image_grid_thw"), (VIDEO, "pixel_values_videos", "video_grid_thw")):
            if pixels in inputs:
                get = vlm.get_image_features if token == IMAGE else vlm.get_video_features
                out = get(inputs[pixels], inputs[grid])
                embeds[ids == token] = torch.cat(out.pooler_output)
                for layer, features in enumerate(out.deepstack_features):
                    deepstack[layer][rank[ids == token]] = torch.cat(features)
        rows = rank[keep & visual]
        stack = vlm.language_model
        out = stack(inputs_embeds=embeds[keep].unsqueeze(0), visual_pos_masks=(visual & keep)[keep].unsqueeze(0),
                    deepstack_visual_embeds=[d[rows] for d in deepstack], use_cache=bool(steps))
        if not steps:
            return model.lm_head(out.last_hidden_state)
        scores, cache = [model.lm_head(out.last_hidden_state[:, -1])], out.cache
        for _ in range(1, steps):
            out = stack(inputs_embeds=model.get_input_embeddings()(scores[-1].argmax(-1, keepdim=True)), cache=cache, use_cache=True)
            cache = out.cache
            scores.append(model.lm_head(out.last_hidden_state[:, -1]))
    return torch.stack(scores, 1)


def test_keep_all_is_bit_identical_for_every_placement_and_removal_restores_hooks():
    model = tiny_moe()
    inputs, _ = batch(WITH_VIDEO)
    recipes = (PRE_LLM, LAYER_IN, LAYER_AFTER, SCHEDULE.replace("ratio=0.5", "ratio=1.0"), VISION)
    check_keep_all_every_placement(model, inputs, recipes, Qwen3VLMoeAdapter, [6, 9, 2, 3, 8], logits)


@pytest.mark.parametrize(
    "recipe,from_layer", [(PRE_LLM, 0), (LAYER_IN, 1), (LAYER_AFTER, 2), (VISION, 0)],
    ids=["pre_llm", "layer1", "layer2", "vision"],
)
def test_keep_positions_match_masked_reference(recipe, from_layer):
    """Images of different sizes and counts and a timestamped video, left padded: the kept tokens' logits equal
    the unpruned model's with the dropped tokens masked out from ``from_layer`` on."""
    inputs, layouts = batch(WITH_VIDEO)
    check_keep_positions(tiny_moe(), inputs, layouts, recipe, from_layer, [3, 3, 2, 3, 3])


def test_schedule_keep_matches_masked_reference():
    inputs, layouts = batch(WITH_VIDEO)
    check_schedule_keep(tiny_moe(), inputs, layouts, {1: [4, 4, 2, 3, 4], 2: [2, 2, 1, 2, 2]})


@pytest.mark.parametrize("recipe", [PRE_LLM, LAYER_IN], ids=["pre_llm", "layer1"])
def test_compact_positions(recipe):
    """pre_llm: equals the text model fed only the kept tokens (kept-only forward); layer(1): the masked reference
    with rotary embeddings of 0..K-1 in layers >= 1."""
    inputs, layouts = batch([Sample(images=((3, 3),), videos=((2, 1, 2),), question=(20, 21, 22, 23))])
    check_compact_positions(tiny_moe(), inputs, layouts, recipe, 1, compact_reference)


@pytest.mark.parametrize(
    "recipe,from_layer,positions",
    [(PRE_LLM, 0, "keep"), (LAYER_IN, 1, "keep"), (LAYER_AFTER, 2, "compact"), (VISION, 0, "keep")],
    ids=["pre_llm", "layer1", "layer2-compact", "vision"],
)
def test_generate_matches_masked_reference(recipe, from_layer, positions):
    inputs, layouts = batch(WITH_VIDEO)
    check_generate(tiny_moe(), inputs, layouts, recipe, from_layer, positions)


def test_generate_compact_pre_llm_matches_kept_tokens_only():
    inputs, layouts = batch([Sample(images=((3, 3),), videos=((2, 1, 2),), question=(20, 21, 22, 23))])
    check_generate_compact(tiny_moe(), inputs, layouts, compact_reference)


@pytest.mark.parametrize(
    "recipe,positions", [(PRE_LLM, "keep"), (SCHEDULE, "compact"), (VISION, "keep")],
    ids=["pre_llm", "schedule-compact", "vision"],
)
def test_left_padded_batch_equals_each_sample_alone(recipe, positions):
    check_batch_equals_each_sample_alone(tiny_moe(), WITH_VIDEO, recipe, positions, timestamps=True)


@pytest.mark.parametrize("recipe", [PRE_LLM, LAYER_IN, VISION], ids=["pre_llm", "layer1", "vision"])
def test_sdpa_equals_eager(recipe):
    inputs, layouts = batch(WITH_VIDEO)
    check_sdpa_equals_eager(tiny_moe, inputs, layouts, recipe)


def test_vision_rows_are_merge_units_and_values_go_through_the_merger():
    model = tiny_moe()
    inputs, _ = batch(WITH_VIDEO)
    own = check_own_values_go_through_the_merger(model, inputs)
    check_merge_units(model, inputs, own.signals[-1], model.config.vision_config.hidden_size)


def _samples(model, numbers) -> dict:
    return batch([WITH_VIDEO[n % len(WITH_VIDEO)] for n in numbers])[0]


@pytest.mark.parametrize(
    "recipe,keep_all",
    [
        (PRE_LLM, None),
        ("attention+critical+fps+layer(k=2)", None),
        ("attention+critical+fps+schedule(layers=[1,2],ratio=0.5)", "attention+critical+fps+schedule(layers=[1,2],ratio=1.0)"),
    ],
    ids=["pre_llm", "layer", "schedule"],
)
def test_check_adapter_passes(recipe, keep_all):
    check_adapter(tiny_moe, _samples, recipe, budgets=(3, 0.5), samples=(0, 2), keep_all_recipe=keep_all)


def test_base_model_and_errors():
    """``Qwen3VLMoeModel`` is supported too; no CLS signals, no CLIP space."""
    model = tiny_moe()
    inputs, _ = batch(MIXED)
    check_base_model_matches(model, inputs, LAYER_IN, 3, Qwen3VLMoeAdapter, TOL, logits)
    with pytest.raises(MissingSignalError, match="cls_attention"):
        prune(model, NeedsCls(compose(PRE_LLM).placement), budget=3)
    with pytest.raises(VtpruneError, match="pre_llm_clip' \\(Qwen3-VL-MoE's tower is not a CLIP model"):
        prune(model, "cdpruner", budget=3, clip_model=object())


def test_module_docstring_examples_run():
    import vtprune.adapters.qwen3_vl_moe as module

    check_docstring_examples(module)


def test_video_rows_carry_their_frames():
    """frames = (grid_t, h / m, w / m) of each video, frame t's tokens = the model's own get_video_features rows of
    frame t; image rows (0, 0, 0); batch == alone."""
    from frame_checks import check_frames, check_frames_batch_equals_alone, grid_rows

    model = tiny_moe()
    samples = WITH_VIDEO + [Sample(images=(), videos=((3, 1, 2), (2, 2, 1)), question=(26, 27), seed=3)]
    inputs, layouts = batch(samples)
    check_frames(model, inputs, grid_rows(model, inputs, layouts), logits)
    check_frames_batch_equals_alone(model, inputs, [batch([s])[0] for s in samples], logits)
