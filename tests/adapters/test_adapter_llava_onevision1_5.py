"""LLaVA-OneVision-1.5 adapter against independent references (tiny random
``LlavaOnevision15ForConditionalGeneration``: RICE-ViT tower with a per-frame CLS token and a 2 x 2 patch merger,
Qwen3 decoder with 1-D positions; CPU, fp32, one thread).

Inputs are written as the Qwen2.5-VL processor writes them (``qwen_fixtures.Sample``: ``<|vision_start|>``,
placeholders, ``<|vision_end|>``; a video is one run of ``t * h * w`` placeholders), with the position ids
``generate`` uses (cumulative sum of the mask). References, written without the adapter: the unpruned model with
the dropped tokens masked out of attention from the drop layer on (``adapter_fixtures.masked_reference``, which for
``compact`` also renumbers the rotary positions), and the model fed only the kept tokens as ``inputs_embeds``
(merged with the model's own ``get_image_features`` / ``get_video_features``). Tolerance: 1e-5 on logits.
"""

from __future__ import annotations

from typing import Sequence

import pytest
import torch

from adapter_fixtures import (
    NeedsCls, aligned, forward_logits, generation_positions, masked_reference, removed_by_layer,
    single_thread,
)
from family_checks import (
    check_base_model_matches,
    check_docstring_examples,
    check_keep_all_every_placement,
    check_text_only_untouched,
)
from qwen_fixtures import (
    CHANNELS, END, IMAGE, MERGE, MIXED, PAD, PATCH, PRE_LLM, SCHEDULE, TOKEN_IDS, VIDEO, VISION, VOCAB, WITH_VIDEO,
    Sample, build, check_merge_units, check_own_values_go_through_the_merger, check_sdpa_equals_eager, kept_mask,
    logits,
)
from qwen_fixtures import batch as qwen_batch
from vtprune.adapters.llava_onevision1_5 import LlavaOnevision15Adapter
from vtprune.framework import MissingSignalError, VtpruneError, compose, prune
from vtprune.testing import check_adapter

TOL = 1e-5
LAYER = "attention+critical+diversity.none+split+layer(k=1)"
LAYER2 = "attention+critical+fps+layer(k=2)"

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def tiny_ov15(attn: str = "sdpa", seed: int = 0, layers: int = 3):
    """A random ``LlavaOnevision15ForConditionalGeneration``: Qwen3 text model (4 heads, GQA 4/2, 8 dims, q/k
    norms), vision 2 blocks of width 16 with 2 x 2 patches and 2 x 2 merging."""
    from transformers import LlavaOnevision15Config, LlavaOnevision15ForConditionalGeneration

    text = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, eos_token_id=END, pad_token_id=PAD,
        bos_token_id=None,
    )
    vision = dict(
        depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=PATCH,
        spatial_merge_size=MERGE, in_channels=CHANNELS,
    )
    config = LlavaOnevision15Config(text_config=text, vision_config=vision, **TOKEN_IDS)
    return build(LlavaOnevision15ForConditionalGeneration, config, attn, seed)


def batch(samples: Sequence[Sample]) -> tuple[dict, list]:
    """Left-padded inputs (Qwen2.5-VL layout) with ``generate``'s position ids; each sample's patches (C * P * P
    values, no temporal patch) drawn from its own seed, so a sample alone gets the same pixels."""
    inputs, layouts = qwen_batch(samples)
    inputs.pop("mm_token_type_ids")
    width = CHANNELS * PATCH * PATCH
    for key, kind in (("pixel_values", "images"), ("pixel_values_videos", "videos")):
        parts = []
        for sample in samples:
            generator = torch.Generator().manual_seed(2000 + sample.seed)
            grids = [(1, *g) for g in sample.images] if kind == "images" else list(sample.videos)
            parts += [torch.randn(t * h * w * MERGE * MERGE, width, generator=generator) for t, h, w in grids]
        if parts:
            inputs[key] = torch.cat(parts)
    inputs["position_ids"] = generation_positions(inputs["attention_mask"])
    return inputs, layouts


def kept_only(model, inputs: dict, keep: torch.Tensor) -> dict:
    """``inputs_embeds`` / mask / positions of only the ``keep`` (B, L) tokens, left padded; the visual embeddings
    are the model's own ``get_image_features`` / ``get_video_features``."""
    ids, vlm = inputs["input_ids"], model.model
    with torch.no_grad():
        embeds = vlm.get_input_embeddings()(ids).clone()  # (B, L, D)
        if "pixel_values" in inputs:
            embeds[ids == IMAGE] = torch.cat(vlm.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
        if "pixel_values_videos" in inputs:
            videos = vlm.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
            embeds[ids == VIDEO] = torch.cat(videos)
    rows = [embeds[b, keep[b]] for b in range(ids.shape[0])]
    width = max(r.shape[0] for r in rows)
    out = torch.zeros(len(rows), width, embeds.shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, width - r.shape[0] :], mask[b, width - r.shape[0] :] = r, 1
    return {"inputs_embeds": out, "attention_mask": mask, "position_ids": generation_positions(mask)}


def test_keep_all_is_bit_identical_for_every_placement_and_removal_restores_hooks():
    model = tiny_ov15()
    inputs, _ = batch(WITH_VIDEO)
    recipes = (PRE_LLM, LAYER, LAYER2, SCHEDULE.replace("ratio=0.5", "ratio=1.0"), VISION)
    check_keep_all_every_placement(model, inputs, recipes, LlavaOnevision15Adapter, [6, 9, 2, 3, 8], logits)


@pytest.mark.parametrize(
    "recipe,positions",
    [(PRE_LLM, "keep"), (LAYER, "keep"), (LAYER2, "compact"), (SCHEDULE, "keep"), (SCHEDULE, "compact"), (VISION, "keep")],
    ids=["pre_llm", "layer1", "layer2-compact", "schedule", "schedule-compact", "vision"],
)
def test_prefill_and_generate_match_masked_reference(recipe, positions):
    """Images of different sizes and counts and a video, left padded: the kept tokens' logits and 8 greedy tokens
    equal the unpruned model's with the dropped tokens masked out (``keep``: same positions; ``compact``: the
    layers after the drop see renumbered positions); the last layer's cache holds only the kept slots."""
    model = tiny_ov15()
    inputs, layouts = batch(WITH_VIDEO)
    length = inputs["input_ids"].shape[1]
    with prune(model, recipe, budget=3, positions=positions) as handle:
        out = logits(model, inputs)
        result = handle.last_selection
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    kept_mask(result, inputs, layouts)  # the reported rows are the items the test wrote
    removed = removed_by_layer(result, *inputs["input_ids"].shape, len(model.model.language_model.layers))
    assert generated.cache.layers[-1].keys.shape[-2] == int((~removed[-1]).sum(1).max()) + 7
    with masked_reference(model, removed, positions):
        reference = forward_logits(model, inputs, use_cache=False)
        expected = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    got, want = aligned(out, result, reference, inputs["attention_mask"])
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    assert torch.equal(generated.sequences[:, length:], expected[:, length:])


@pytest.mark.parametrize("recipe", [PRE_LLM, VISION], ids=["pre_llm", "vision"])
def test_compact_at_the_input_equals_the_kept_tokens_only(recipe):
    """``compact`` after a drop at the decoder input: logits and 8 greedy tokens of the model fed only the kept
    tokens."""
    model = tiny_ov15()
    inputs, layouts = batch(WITH_VIDEO)
    length = inputs["input_ids"].shape[1]
    with prune(model, recipe, budget=3, positions="compact") as handle:
        out = logits(model, inputs)
        result = handle.last_selection
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    reference_inputs = kept_only(model, inputs, kept_mask(result, inputs, layouts))
    reference = forward_logits(model, reference_inputs)
    real = result.sequence_mask & inputs["attention_mask"].bool().gather(1, result.sequence_index)
    torch.testing.assert_close(out[real], reference[reference_inputs["attention_mask"].bool()], atol=TOL, rtol=0)
    reference_inputs.pop("position_ids")
    expected = model.generate(**reference_inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(generated[:, length:], expected[:, -8:])


@pytest.mark.parametrize(
    "recipe,positions", [(PRE_LLM, "keep"), (SCHEDULE, "compact"), (VISION, "keep")],
    ids=["pre_llm", "schedule-compact", "vision"],
)
def test_left_padded_batch_equals_each_sample_alone(recipe, positions):
    model = tiny_ov15()
    inputs, _ = batch(WITH_VIDEO)
    length = inputs["input_ids"].shape[1]
    with prune(model, recipe, budget=3, positions=positions):
        together = logits(model, inputs)[:, -1]
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, length:]
        for b, sample in enumerate(WITH_VIDEO):
            alone, _ = batch([sample])
            torch.testing.assert_close(logits(model, alone)[:, -1], together[b : b + 1], atol=TOL, rtol=0)
            tokens = model.generate(**alone, max_new_tokens=4, do_sample=False)[:, alone["input_ids"].shape[1] :]
            assert torch.equal(tokens, generated[b : b + 1])


@pytest.mark.parametrize("recipe", [PRE_LLM, LAYER, VISION], ids=["pre_llm", "layer1", "vision"])
def test_sdpa_equals_eager(recipe):
    inputs, layouts = batch(WITH_VIDEO)
    check_sdpa_equals_eager(tiny_ov15, inputs, layouts, recipe)


def test_vision_rows_are_merge_units_and_values_go_through_the_merger():
    model = tiny_ov15()
    inputs, _ = batch(WITH_VIDEO)
    own = check_own_values_go_through_the_merger(model, inputs)
    check_merge_units(model, inputs, own.signals[-1], model.config.vision_config.hidden_size)


def _samples(model, numbers) -> dict:
    return batch([WITH_VIDEO[n % len(WITH_VIDEO)] for n in numbers])[0]


@pytest.mark.parametrize(
    "recipe,keep_all",
    [
        (PRE_LLM, None),
        (LAYER2, None),
        ("attention+critical+fps+schedule(layers=[1,2],ratio=0.5)", "attention+critical+fps+schedule(layers=[1,2],ratio=1.0)"),
    ],
    ids=["pre_llm", "layer", "schedule"],
)
def test_check_adapter_passes(recipe, keep_all):
    check_adapter(tiny_ov15, _samples, recipe, budgets=(3, 0.5), samples=(0, 2), keep_all_recipe=keep_all)


def test_base_model_and_errors():
    """``LlavaOnevision15Model`` is supported too; no CLS signals, no CLIP space; text-only calls are untouched."""
    model = tiny_ov15()
    inputs, _ = batch(MIXED)
    check_base_model_matches(model, inputs, LAYER, 3, LlavaOnevision15Adapter, TOL, logits)
    with pytest.raises(MissingSignalError, match="cls_attention"):
        prune(model, NeedsCls(compose(PRE_LLM).placement), budget=3)
    with pytest.raises(MissingSignalError, match="cls_attention.*CLS token"):
        prune(model, "visionzip", budget=3)
    with pytest.raises(VtpruneError, match="pre_llm_clip' \\(LLaVA-OneVision-1.5's tower is not a CLIP model"):
        prune(model, "cdpruner", budget=3, clip_model=object())
    ids = torch.tensor([[2, 5, 6, END, 2, 20, 21, 22]])
    check_text_only_untouched(model, ids, LAYER, 3, logits)


def test_module_docstring_examples_run():
    import vtprune.adapters.llava_onevision1_5 as module

    check_docstring_examples(module)


def test_video_rows_carry_their_frames():
    """frames = (grid_t, h / m, w / m) of each video, frame t's tokens = the model's own get_video_features rows of
    frame t; image rows (0, 0, 0); batch == alone."""
    from frame_checks import check_frames, check_frames_batch_equals_alone, grid_rows

    model = tiny_ov15()
    samples = WITH_VIDEO + [Sample(images=(), videos=((3, 1, 2), (2, 2, 1)), question=(26, 27), seed=3)]
    inputs, layouts = batch(samples)
    check_frames(model, inputs, grid_rows(model, inputs, layouts), logits)
    check_frames_batch_equals_alone(model, inputs, [batch([s])[0] for s in samples], logits)
