"""GLM-4.1V adapter against independent references (tiny random ``Glm4vForConditionalGeneration``, CPU, fp32, one
thread).

Inputs are written as GLM-4.1V's processor writes them: an image is ``<|begin_of_image|>`` + placeholders +
``<|end_of_image|>``; a video is ``<|begin_of_video|>``, then per frame ``<|begin_of_image|>`` + placeholders (the
*image* token id) + ``<|end_of_image|>`` + a timestamp, then ``<|end_of_video|>``; ``mm_token_type_ids`` says 1 for
image and 2 for video placeholders. The model rejects images and videos in one forward, so batches hold either.
References, written without the adapter (``qwen_fixtures``): the unpruned model with the dropped tokens masked out
of attention from the drop layer on (same M-RoPE ids from the model's own ``get_rope_index``; ``compact``: rotary
embeddings of 0..K-1 after the drop), and the text model fed only the kept tokens. Tolerance: 1e-5 on logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pytest
import torch

from adapter_fixtures import NeedsCls, left_pad, record_hooks, single_thread
from family_checks import (
    check_base_model_matches,
    check_docstring_examples,
    check_keep_all_every_placement,
    check_text_only_untouched,
)
from qwen_fixtures import (
    END, PAD, PRE_LLM, SCHEDULE, TOL, TURN, VISION, Recording, aligned, build, check_compact_positions,
    check_generate, check_keep_positions, check_manual_decoding, check_schedule_keep, check_sdpa_equals_eager,
    kept_mask, logits,
)
from vtprune.adapters.glm4v import Glm4vAdapter, video_token_mask
from vtprune.framework import MissingSignalError, VtpruneError, compose, prune
from vtprune.testing import check_adapter

VOCAB, SECONDS = 64, 40
IMAGE_START, IMAGE_END, VIDEO_START, VIDEO_END, IMAGE, VIDEO = 56, 57, 58, 59, 62, 63
MERGE, PATCH, TEMPORAL, CHANNELS = 2, 2, 2, 3
LAYER_IN = "attention+critical+diversity.none+split+layer(k=1)"
LAYER_AFTER = "attention+critical+diversity.none+split+layer(k=2)"

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def tiny_glm4v(attn: str = "sdpa", seed: int = 0, layers: int = 3):
    """A random ``Glm4vForConditionalGeneration``: text 4 heads (GQA 4/2) of 16 dims, half of each rotated
    (partial rotary 0.5), M-RoPE sections (2, 1, 1); vision 2 blocks of width 16, 2 x 2 patches merged 2 x 2 by the
    conv downsampler, a 4 x 4 learned position grid."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    text = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=END, pad_token_id=PAD,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    )
    vision = dict(
        depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=PATCH, image_size=8,
        spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, in_channels=CHANNELS,
    )
    config = Glm4vConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
        image_start_token_id=IMAGE_START, image_end_token_id=IMAGE_END, video_start_token_id=VIDEO_START,
        video_end_token_id=VIDEO_END,
    )
    return build(Glm4vForConditionalGeneration, config, attn, seed)


@dataclass(frozen=True)
class Sample:
    """One prompt: images as (h, w) or videos as (t, h, w) in merged LLM tokens, a question."""

    images: tuple = ()
    videos: tuple = ()
    question: tuple = (20, 21, 22)
    seed: int = 0

    def tokens(self) -> tuple[list[int], list]:
        """GLM-4.1V-template-like ids and the (kind, placeholder positions, grid) of every visual item."""
        ids, items = [TURN, 5, 6, END, TURN, 7], []
        for h, w in self.images:
            ids.append(IMAGE_START)
            items.append(("image", list(range(len(ids), len(ids) + h * w)), (1, h, w)))
            ids += [IMAGE] * (h * w) + [IMAGE_END]
        for t, h, w in self.videos:
            ids.append(VIDEO_START)
            positions = []
            for frame in range(t):
                ids.append(IMAGE_START)
                positions += range(len(ids), len(ids) + h * w)
                ids += [IMAGE] * (h * w) + [IMAGE_END, SECONDS + frame]
            ids.append(VIDEO_END)
            items.append(("video", positions, (t, h, w)))
        return ids + list(self.question) + [END, TURN, 8], items


def batch(samples: Sequence[Sample]) -> tuple[dict, list]:
    """Left-padded inputs and, per sample, its visual items (kind, padded positions, grid); pixels per sample from
    its own seed (a sample alone gets the same pixels)."""
    rows, layouts, images, videos = [], [], [], []
    width = CHANNELS * TEMPORAL * PATCH * PATCH
    for sample in samples:
        ids, items = sample.tokens()
        rows.append(ids)
        layouts.append(items)
        generator = torch.Generator().manual_seed(1000 + sample.seed)
        for h, w in sample.images:
            images.append((torch.randn(h * w * MERGE * MERGE, width, generator=generator), (1, h * MERGE, w * MERGE)))
        for t, h, w in sample.videos:
            videos.append((torch.randn(t * h * w * MERGE * MERGE, width, generator=generator), (t, h * MERGE, w * MERGE)))
    ids, mask = left_pad(rows, PAD)
    length = ids.shape[1]
    layouts = [[(k, [p + length - len(r) for p in ps], g) for k, ps, g in items] for r, items in zip(rows, layouts)]
    inside = video_token_mask(ids, VIDEO_START, VIDEO_END)
    inputs = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": ((ids == IMAGE).int() * (1 + inside.int()))}
    for key, grid_key, parts in (("pixel_values", "image_grid_thw", images), ("pixel_values_videos", "video_grid_thw", videos)):
        if parts:
            inputs[key] = torch.cat([p for p, _ in parts])
            inputs[grid_key] = torch.tensor([g for _, g in parts])
    return inputs, layouts


IMAGES = [
    Sample(images=((2, 3),), question=(20, 21, 22), seed=0),
    Sample(images=((3, 3), (1, 2)), question=(23, 24), seed=1),
]
VIDEOS = [
    Sample(videos=((2, 2, 2),), question=(25,), seed=2),
    Sample(videos=((3, 1, 2), (2, 1, 1)), question=(26, 27), seed=3),
]
BATCHES = {"images": (IMAGES, [3, 3, 2]), "videos": (VIDEOS, [3, 3, 2])}


def compact_reference(model, inputs: dict, keep: torch.Tensor, steps: int = 0) -> torch.Tensor:
    """The text model fed only the kept tokens of one unpadded sample (embeddings merged with the model's own
    ``get_image_features`` / ``get_video_features``; positions 0..K-1 on all axes): logits, or ``steps`` greedy
    steps' logits."""
    assert keep.shape[0] == 1 and bool(inputs["attention_mask"].all())
    ids, vlm = inputs["input_ids"], model.model
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids).clone()  # (1, L, D)
        for pixels, grid, get in (("pixel_values", "image_grid_thw", vlm.get_image_features), ("pixel_values_videos", "video_grid_thw", vlm.get_video_features)):
            if pixels in inputs:
                embeds[ids == IMAGE] = torch.cat(get(inputs[pixels], inputs[grid]).pooler_output)
        stack = vlm.language_model
        out = stack(inputs_embeds=embeds[keep].unsqueeze(0), use_cache=bool(steps))
        if not steps:
            return model.lm_head(out.last_hidden_state)
        scores, cache = [model.lm_head(out.last_hidden_state[:, -1])], out.cache
        for _ in range(1, steps):
            out = stack(inputs_embeds=model.get_input_embeddings()(scores[-1].argmax(-1, keepdim=True)), cache=cache, use_cache=True)
            cache = out.cache
            scores.append(model.lm_head(out.last_hidden_state[:, -1]))
    return torch.stack(scores, 1)


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(BATCHES))
def test_keep_all_is_bit_identical_for_every_placement_and_removal_restores_hooks(kind):
    model = tiny_glm4v()
    inputs, layouts = batch(BATCHES[kind][0])
    recipes = (PRE_LLM, LAYER_IN, LAYER_AFTER, SCHEDULE.replace("ratio=0.5", "ratio=1.0"), VISION)
    check_keep_all_every_placement(model, inputs, recipes, Glm4vAdapter, [len(p) for items in layouts for _, p, _ in items], logits)


@pytest.mark.parametrize("kind", list(BATCHES))
@pytest.mark.parametrize(
    "recipe,from_layer", [(PRE_LLM, 0), (LAYER_IN, 1), (LAYER_AFTER, 2), (VISION, 0)],
    ids=["pre_llm", "layer1", "layer2", "vision"],
)
def test_keep_positions_match_masked_reference(recipe, from_layer, kind):
    """Images of different sizes and counts, or timestamped videos, left padded: the kept tokens' logits equal
    the unpruned model's with the dropped tokens masked out from ``from_layer`` on (same M-RoPE ids)."""
    samples, counts = BATCHES[kind]
    inputs, layouts = batch(samples)
    check_keep_positions(tiny_glm4v(), inputs, layouts, recipe, from_layer, counts)


def test_schedule_keep_matches_masked_reference():
    inputs, layouts = batch(IMAGES)
    check_schedule_keep(tiny_glm4v(), inputs, layouts, {1: [4, 4, 2], 2: [2, 2, 1]})


@pytest.mark.parametrize("kind", list(BATCHES))
@pytest.mark.parametrize("recipe", [PRE_LLM, LAYER_IN], ids=["pre_llm", "layer1"])
def test_compact_positions(recipe, kind):
    """pre_llm: the text model fed only the kept tokens; layer(1): the masked reference with rotary embeddings of
    0..K-1 in layers >= 1."""
    inputs, layouts = batch(BATCHES[kind][0][1:])
    check_compact_positions(tiny_glm4v(), inputs, layouts, recipe, 1, compact_reference)


@pytest.mark.parametrize("kind", list(BATCHES))
@pytest.mark.parametrize(
    "recipe,from_layer,positions",
    [(PRE_LLM, 0, "keep"), (LAYER_IN, 1, "keep"), (LAYER_AFTER, 2, "compact"), (VISION, 0, "keep")],
    ids=["pre_llm", "layer1", "layer2-compact", "vision"],
)
def test_generate_matches_masked_reference(recipe, from_layer, positions, kind):
    inputs, layouts = batch(BATCHES[kind][0])
    check_generate(tiny_glm4v(), inputs, layouts, recipe, from_layer, positions)


def test_generate_compact_pre_llm_matches_kept_tokens_only():
    model = tiny_glm4v()
    inputs, layouts = batch(VIDEOS[1:])
    length = inputs["input_ids"].shape[1]
    with prune(model, PRE_LLM, budget=3, positions="compact") as handle:
        ours = model.generate(**inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True)
        keep = kept_mask(handle.last_selection, inputs, layouts)
    reference = compact_reference(model, inputs, keep, steps=8)
    assert torch.equal(ours.sequences[:, length:], reference.argmax(-1))
    torch.testing.assert_close(torch.stack(ours.logits, 1), reference, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "kind,recipe,positions",
    [("images", PRE_LLM, "keep"), ("images", SCHEDULE, "compact"), ("images", VISION, "keep"), ("videos", LAYER_IN, "keep"), ("videos", VISION, "compact")],
    ids=["images-pre_llm", "images-schedule-compact", "images-vision", "videos-layer1", "videos-vision-compact"],
)
def test_left_padded_batch_equals_each_sample_alone(kind, recipe, positions):
    model = tiny_glm4v()
    samples = BATCHES[kind][0]
    inputs, _ = batch(samples)
    length = inputs["input_ids"].shape[1]
    with prune(model, recipe, budget=3, positions=positions):
        together = logits(model, inputs)[:, -1]
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, length:]
        for b, sample in enumerate(samples):
            alone, _ = batch([sample])
            torch.testing.assert_close(logits(model, alone)[:, -1], together[b : b + 1], atol=TOL, rtol=0)
            tokens = model.generate(**alone, max_new_tokens=4, do_sample=False)[:, alone["input_ids"].shape[1] :]
            assert torch.equal(tokens, generated[b : b + 1])


@pytest.mark.parametrize("recipe", [PRE_LLM, LAYER_IN, VISION], ids=["pre_llm", "layer1", "vision"])
def test_sdpa_equals_eager(recipe):
    inputs, layouts = batch(VIDEOS)
    check_sdpa_equals_eager(tiny_glm4v, inputs, layouts, recipe)


@pytest.mark.parametrize("positions", ["keep", "compact"])
def test_manual_decoding_without_position_ids_follows_rope_deltas(positions):
    inputs, _ = batch(VIDEOS[:1])
    check_manual_decoding(tiny_glm4v(), inputs, LAYER_IN, positions, steps=5)


@pytest.mark.parametrize("kind", list(BATCHES))
def test_items_prompt_span_and_vision_rows(kind):
    """One row per image / video (all frames); the prompt is the question only (no markers, no timestamps); at
    ``vision`` each row is the merger's input of its tokens (the merger maps it to the model's own features)."""
    model = tiny_glm4v()
    samples = BATCHES[kind][0]
    inputs, layouts = batch(samples)
    for recipe in (PRE_LLM, VISION):
        recording = Recording(compose(recipe))
        with prune(model, recording, budget=3) as handle:
            logits(model, inputs)
            kept_mask(handle.last_selection, inputs, layouts)
        signals = recording.signals[-1]
        if recipe == PRE_LLM:
            questions = [len(s.question) for s in samples for _ in (s.images or s.videos)]
            assert signals.prompt_mask.sum(1).tolist() == questions
            continue
        vlm = model.model
        pixels, grid = ("pixel_values", "image_grid_thw") if kind == "images" else ("pixel_values_videos", "video_grid_thw")
        get = vlm.get_image_features if kind == "images" else vlm.get_video_features
        with torch.no_grad():
            tokens = get(inputs[pixels], inputs[grid]).pooler_output
            for row, expected in enumerate(tokens):
                n = expected.shape[0]
                assert int(signals.visual_mask[row].sum()) == n
                torch.testing.assert_close(vlm.visual.merger(signals.visual[row, :n]), expected, atol=1e-6, rtol=0)


def _samples(model, numbers) -> dict:
    return batch([IMAGES[n % len(IMAGES)] for n in numbers])[0]


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
    check_adapter(tiny_glm4v, _samples, recipe, budgets=(3, 0.5), keep_all_recipe=keep_all)


def test_base_model_and_errors():
    """``Glm4vModel`` is supported too; no CLS signals, no CLIP space; text-only calls are untouched."""
    model = tiny_glm4v()
    inputs, _ = batch(IMAGES)
    check_base_model_matches(model, inputs, LAYER_IN, 3, Glm4vAdapter, TOL, logits)
    with pytest.raises(MissingSignalError, match="cls_attention"):
        prune(model, NeedsCls(compose(PRE_LLM).placement), budget=3)
    with pytest.raises(VtpruneError, match="pre_llm_clip' \\(GLM-4.1V's tower is not a CLIP model"):
        prune(model, "cdpruner", budget=3, clip_model=object())
    ids = torch.tensor([[TURN, 5, 6, END, TURN, 20, 21, 22]])
    check_text_only_untouched(model, ids, LAYER_IN, 3, logits)


def test_module_docstring_examples_run():
    import vtprune.adapters.glm4v as module

    check_docstring_examples(module)


def test_video_rows_carry_their_frames():
    """A GLM-4.1V video (frames written one by one between image markers, each followed by its timestamp) is one
    row: frames = (grid_t, h / m, w / m), frame t's tokens = the model's own get_video_features rows of frame t;
    image rows (0, 0, 0); batch == alone."""
    from frame_checks import check_frames, check_frames_batch_equals_alone, grid_rows

    model = tiny_glm4v()
    for samples in (IMAGES, VIDEOS):
        inputs, layouts = batch(samples)
        check_frames(model, inputs, grid_rows(model, inputs, layouts), logits)
        check_frames_batch_equals_alone(model, inputs, [batch([s])[0] for s in samples], logits)
