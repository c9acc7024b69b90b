"""LLaVA-OneVision adapter (AnyRes crops + image-newline tokens, images and videos) against independent references."""

from __future__ import annotations

import pytest
import torch

from adapter_fixtures import (
    keep_all_params,
    PLACEMENT_RECIPES,
    NeedsCls,
    SignalRecorder,
    check_batch_equals_samples_alone,
    check_forward_and_generate,
    llava_onevision_inputs,
    merged_embeddings,
    record_hooks,
    sample_alone,
    single_thread,
    tiny_llava_onevision,
)
from adapter_fixtures import forward_logits as _forward
from vtprune import framework
from vtprune.adapters.llava_onevision import LlavaOnevisionAdapter
from vtprune.framework import MissingSignalError, VtpruneError
from vtprune.framework.errors import BudgetError
from vtprune.framework.support import support_problems
from vtprune.framework.compose import compose
from vtprune.framework.prune import prune

ATOL = 1e-5
RECIPES = {name: recipe for name, recipe in PLACEMENT_RECIPES.items() if name != "vision"}
PLACEMENTS = list(RECIPES)
#: sample 0: one image (AnyRes crops, its 8x8 crop grid down-scaled to 5x5 by anyres_max_2); sample 1: two images
#: (a multi-image sample: one crop each, since the batch carries batch_num_images)
IMAGES = ((("image", (56, 56)),), (("image", (30, 50)), ("image", (28, 28))))
#: sample 0: a video then an image; sample 1: an image then a video (no batch_num_images: every image is cropped)
VIDEO = ((("video",), ("image", (30, 50))), (("image", (56, 28)), ("video",)))
SPECS = {"images": IMAGES, "video": VIDEO}
BATCHES = list(SPECS)

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def model():
    return tiny_llava_onevision()


@pytest.fixture(scope="module")
def batches(model):
    return {
        "images": llava_onevision_inputs(model, IMAGES, question_lengths=(5, 3)),
        "video": llava_onevision_inputs(model, VIDEO, question_lengths=(3, 6), batch_num_images=False, seed=1),
    }


def _own_counts(model, inputs, spec):
    """Tokens per image / video in sequence order, from the model's own get_image_features / get_video_features."""
    vlm = model.model
    images, videos = [], []
    with torch.no_grad():
        if "pixel_values" in inputs:
            extra = {"batch_num_images": inputs["batch_num_images"]} if "batch_num_images" in inputs else {}
            features = vlm.get_image_features(inputs["pixel_values"], inputs["image_sizes"], **extra).pooler_output
            images = [int(f.shape[0]) for f in features]
        if "pixel_values_videos" in inputs:
            videos = [int(f.shape[0]) for f in vlm.get_video_features(inputs["pixel_values_videos"]).pooler_output]
    counts, samples = [], []
    for b, sample in enumerate(spec):
        for item in sample:
            counts.append(images.pop(0) if item[0] == "image" else videos.pop(0))
            samples.append(b)
    return counts, samples


def _alone(inputs, spec, b):
    """Sample ``b`` of a batch on its own (no padding)."""
    image0 = sum(1 for sample in spec[:b] for item in sample if item[0] == "image")
    video0 = sum(1 for sample in spec[:b] for item in sample if item[0] == "video")
    images = sum(1 for item in spec[b] if item[0] == "image")
    videos = sum(1 for item in spec[b] if item[0] == "video")
    out = sample_alone(inputs, b, image0, images)
    if "batch_num_images" in inputs:
        out["batch_num_images"] = inputs["batch_num_images"][b : b + 1]
    if videos:
        out["pixel_values_videos"] = inputs["pixel_values_videos"][video0 : video0 + videos]
    return out


@pytest.mark.parametrize("name", BATCHES)
def test_one_row_per_image_and_video_in_sequence_order_with_per_row_budgets(model, batches, name):
    inputs, spec = batches[name], SPECS[name]
    counts, samples = _own_counts(model, inputs, spec)
    assert len(set(counts)) > 1
    kinds = [item[0] for sample in spec for item in sample]
    for budget, want in (
        (5, [min(5, c) for c in counts]),
        (0.25, [int(c * 0.25 + 0.5) for c in counts]),
        ([3, 7, 2, 9][: len(counts)], [3, 7, 2, 9][: len(counts)]),
        ([0.5, 1.0, 0.1, 0.3][: len(counts)], [int(c * f + 0.5) for c, f in zip(counts, [0.5, 1.0, 0.1, 0.3])]),
    ):
        with prune(model, RECIPES["pre_llm"], budget=budget) as handle:
            _forward(model, inputs)
        result = handle.last_selection
        assert result.num_tokens.tolist() == counts
        assert result.image_sample.tolist() == samples
        assert result.counts.tolist() == want
    # each row's positions are the placeholders of its own kind, rows in sequence order
    ids = inputs["input_ids"]
    token = {"image": model.config.image_token_id, "video": model.config.video_token_id}
    starts = []
    for r, (kind, b) in enumerate(zip(kinds, samples)):
        positions = result.image_positions[r]
        assert torch.all(ids[b, positions] == token[kind])
        assert torch.equal(positions, torch.arange(int(positions[0]), int(positions[0]) + counts[r]))
        starts.append((b, int(positions[0])))
    assert starts == sorted(starts)


@pytest.mark.parametrize("name", BATCHES)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_keep_all_is_bit_identical_and_remove_restores_hooks(model, batches, placement, name):
    inputs = batches[name]
    base = _forward(model, inputs)
    base_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    hooks = record_hooks(model)
    recipe = RECIPES[placement].replace("ratio=0.5", "ratio=1.0")
    with prune(model, recipe, budget=10_000) as handle:
        assert record_hooks(model) != hooks
        out = _forward(model, inputs)
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert handle.last_selection.counts.tolist() == handle.last_selection.num_tokens.tolist()
    assert record_hooks(model) == hooks
    assert torch.equal(out, base)
    assert torch.equal(gen, base_gen)


@pytest.mark.parametrize("name", BATCHES)
@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_pruned_forward_and_generate_match_reference(model, batches, placement, positions, name):
    inputs = batches[name]
    kept_only = positions == "compact" and placement == "pre_llm"
    result = check_forward_and_generate(model, inputs, RECIPES[placement], positions, kept_only, atol=ATOL)
    assert bool((result.counts < result.num_tokens).all())


@pytest.mark.parametrize("name", BATCHES)
@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("placement", ["pre_llm", "layer"])
def test_batch_equals_samples_alone(model, batches, placement, positions, name):
    inputs, spec = batches[name], SPECS[name]
    budgets = [5, 9, 3, 7][: sum(len(sample) for sample in spec)]
    alone, first = [], 0
    for b, sample in enumerate(spec):
        alone.append((_alone(inputs, spec, b), budgets[first : first + len(sample)]))
        first += len(sample)
    check_batch_equals_samples_alone(model, inputs, RECIPES[placement], positions, budgets, alone, atol=ATOL)


def test_prompt_span_excludes_images_and_videos_and_newlines_are_candidates(model, batches):
    inputs, spec = batches["video"], VIDEO
    counts, samples = _own_counts(model, inputs, spec)
    with torch.no_grad():
        embeds = merged_embeddings(model, inputs)
    ids = inputs["input_ids"]
    visual = (ids == model.config.image_token_id) | (ids == model.config.video_token_id)
    newline = model.model.image_newline
    kinds = [item[0] for sample in spec for item in sample]
    for stop in (None, [41, 42]):
        recorder = SignalRecorder(compose(RECIPES["pre_llm"]))
        with prune(model, recorder, budget=10_000, prompt_stop=stop):
            _forward(model, inputs)
        signals = recorder.seen[-1]
        for r, b in enumerate(samples):
            after = int(visual[b].nonzero().max()) + 1  # the text after the sample's last image or video
            end = ids.shape[1] - (2 if stop else 0)
            want = embeds[b, after:end]
            assert int(signals.prompt_mask[r].sum()) == want.shape[0]
            assert torch.equal(signals.prompt[r, : want.shape[0]], want)
            # every token is a candidate, newline tokens (exact copies of image_newline) included
            rows = signals.visual[r, : counts[r]]
            assert bool(signals.visual_mask[r, : counts[r]].all()) and not bool(signals.visual_mask[r, counts[r] :].any())
            is_newline = (rows == newline).all(-1)
            if kinds[r] == "video":
                assert is_newline.nonzero().flatten().tolist() == [counts[r] - 1]  # one newline, after the frames
            else:
                assert int(is_newline.sum()) > 1  # cropped image: one newline per row of the crop grid
            assert signals.grid is None and signals.grids is None


def test_generate_honours_vision_aspect_ratio_and_inputs_embeds_work(model):
    spec = ((("image", (56, 56)),), (("video",), ("image", (56, 28))))
    inputs = llava_onevision_inputs(model, spec, batch_num_images=False, vision_aspect_ratio="anyres_max_9", seed=2)
    counts, _ = _own_counts(model, inputs, spec)  # config ratio (anyres_max_2)
    with torch.no_grad():
        features = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], vision_aspect_ratio="anyres_max_9"
        ).pooler_output
    want = [int(features[0].shape[0]), counts[1], int(features[1].shape[0])]
    assert want[0] > counts[0]  # anyres_max_9 does not down-scale the 8x8 crop grid
    with prune(model, RECIPES["layer"], budget=4) as handle:
        model.generate(**inputs, vision_aspect_ratio="anyres_max_9", max_new_tokens=2, do_sample=False)
    assert handle.last_selection.num_tokens.tolist() == want
    # inputs_embeds instead of input_ids: placeholders found by their embeddings, same pruned forward
    inputs = llava_onevision_inputs(model, VIDEO, batch_num_images=False, seed=3)
    with prune(model, RECIPES["pre_llm"], budget=5) as handle:
        by_ids = _forward(model, inputs)
        indices = handle.last_selection.selection.indices
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        by_embeds = _forward(model, {**{k: v for k, v in inputs.items() if k != "input_ids"}, "inputs_embeds": embeds})
        assert torch.equal(handle.last_selection.selection.indices, indices)
    torch.testing.assert_close(by_embeds, by_ids, atol=ATOL, rtol=0)


def test_vision_placement_and_cls_attention_fail_at_attach(model):
    hooks = record_hooks(model)
    with pytest.raises(VtpruneError, match="LlavaOnevisionForConditionalGeneration.*placement 'vision'.*layer, pre_llm, schedule"):
        prune(model, PLACEMENT_RECIPES["vision"], budget=3)
    with pytest.raises(
        VtpruneError,
        match=r"LlavaOnevisionForConditionalGeneration.*placement 'vision' is not implemented.*\['layer', 'pre_llm', 'schedule', 'sparse_layers'\]",
    ):
        LlavaOnevisionAdapter.runtime(LlavaOnevisionAdapter(model), compose(PLACEMENT_RECIPES["vision"]), 3)

    needs_cls = NeedsCls(compose(RECIPES["pre_llm"]).placement)
    with pytest.raises(MissingSignalError, match="LlavaOnevisionForConditionalGeneration.*cls_attention.*placement 'pre_llm'"):
        prune(model, needs_cls, budget=3)
    with pytest.raises(MissingSignalError, match="LlavaOnevisionForConditionalGeneration.*cls_attention.*'pre_llm'.*no CLS"):
        LlavaOnevisionAdapter.runtime(LlavaOnevisionAdapter(model), needs_cls, 3)
    with pytest.raises(MissingSignalError, match="cls_attention.*placement 'layer'"):
        prune(model, "cls_attention+critical+fps+layer(k=2)", budget=3)
    with pytest.raises(VtpruneError, match="does not implement placement 'pre_llm_clip'"):
        prune(model, "cdpruner", budget=3, clip_model=object())
    for placement in LlavaOnevisionAdapter.placements:
        assert "cls_attention" not in LlavaOnevisionAdapter.provides(placement)
    assert record_hooks(model) == hooks


# ---------------------------------------------------------------------------------------------------------
# Every registered preset: runs where the adapter provides its placement and signals, else a clear error
# ---------------------------------------------------------------------------------------------------------

REGISTRY = framework.build_registry(autoload=False)
PRESETS = sorted(REGISTRY.presets)
#: Adaptive presets that need parameters at budget 6 (SparseVLM's official scale/bias exist for 192 / 128 / 64 only);
#: their count comes from the data and no budget makes them keep every token.
ADAPTIVE_OPTIONS = {"sparsevlm": {"scale": 0.8, "bias": 0.0}}


@pytest.fixture(scope="module")
def deep():
    """A model deep enough for every preset's default drops (PyramidDrop drops before layer 24)."""
    deepest = max(d.layer or 0 for name in PRESETS for d in framework.compose(name, registry=REGISTRY).placement.drops(0.5))
    model = tiny_llava_onevision(layers=deepest + 1)
    spec = ((("image", (30, 50)),), (("video",), ("image", (28, 28))))
    inputs = llava_onevision_inputs(model, spec, question_lengths=(5, 3), seed=2)
    base = _forward(model, inputs)
    gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return dict(model=model, inputs=inputs, base=base, gen=gen)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_or_fails_clearly(deep, preset):
    model, inputs = deep["model"], deep["inputs"]
    pipeline = framework.compose(preset, registry=REGISTRY)
    placement = pipeline.placement.name
    before = record_hooks(model)
    if support_problems(LlavaOnevisionAdapter, pipeline):  # the one support check: drop kinds and their signals
        with pytest.raises(VtpruneError, match=f"LlavaOnevisionForConditionalGeneration.*{placement}"):
            framework.prune(model, preset, budget=6, registry=REGISTRY)
        assert record_hooks(model) == before
        return
    adaptive = bool(getattr(pipeline.budget, "adaptive_counts", False))  # the kept count comes from the data
    budget = 6 if pipeline.budget.keeps_tokens else 0  # VTW's withdraw: its setting, every visual token withdrawn
    length = inputs["input_ids"].shape[1]
    try:
        with framework.prune(model, preset, budget=budget, registry=REGISTRY, **ADAPTIVE_OPTIONS.get(preset, {})) as handle:
            out = _forward(model, inputs)
            gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    except BudgetError as error:  # an adaptive preset without a setting for this budget (SparseVLM: 64/128/192)
        assert adaptive and "budget" in str(error) and record_hooks(model) == before
    else:
        result = handle.last_selection
        first = result.drops[0].counts
        if adaptive:
            assert bool((first > 0).all()) and bool((first <= result.num_tokens).all())
        else:
            assert first.tolist() == [budget] * 3  # one row per image and per video
        assert out.shape[1] < length and bool(torch.isfinite(out).all()) and gen.shape[1] == length + 4
    keep_all = keep_all_params(pipeline)
    with framework.prune(model, preset, budget=10_000, registry=REGISTRY, **keep_all):
        out = _forward(model, inputs)
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, deep["base"]) and torch.equal(gen, deep["gen"])


def _video_rows(model, inputs, spec) -> list:
    """`frame_checks.Row` per item, from the model's own outputs: a video is its frames of apply_pooling's
    ceil(side / 2) x ceil(side / 2) tokens (the model's get_video_features minus its last token, the newline)."""
    from frame_checks import Row

    counts, _ = _own_counts(model, inputs, spec)
    vision = model.config.vision_config
    side = -(-(vision.image_size // vision.patch_size) // 2)
    frames = int(inputs["pixel_values_videos"].shape[1])
    with torch.no_grad():
        videos = list(model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output)  # (T*s*s + 1, D)
    rows = []
    for count, kind in zip(counts, [item[0] for sample in spec for item in sample]):
        if kind == "image":
            rows.append(Row(count))
            continue
        features = videos.pop(0)
        assert count == frames * side * side + 1 and torch.equal(features[-1], model.model.image_newline)
        rows.append(Row(count, (frames, side, side), (count - 1,), features[:-1].reshape(frames, side * side, -1)))
    return rows


def test_video_rows_carry_their_frames(model, batches):
    from frame_checks import check_frames, check_frames_batch_equals_alone

    from frame_checks import FRAME_RECIPES

    inputs = batches["video"]
    decode = {"decode": "attention+critical+fps+decode(prefill='layer(k=1)',layer=2,keep=0.5)"}  # its prefill drop
    check_frames(model, inputs, _video_rows(model, inputs, VIDEO), _forward, {**FRAME_RECIPES, **decode})
    check_frames_batch_equals_alone(model, inputs, [_alone(inputs, VIDEO, b) for b in range(len(VIDEO))], _forward)
    # an image-only batch: every row (0, 0, 0), -1
    from frame_checks import Row

    counts, _ = _own_counts(model, batches["images"], IMAGES)
    check_frames(model, batches["images"], [Row(c) for c in counts], _forward)


def _own_views(model, inputs, spec) -> list[torch.Tensor]:
    """Per row in sequence order, the view of each token from the model's own packing, marked through it: the
    projector's output for crop c of the forward is replaced by the constant c + 1, so each packed image token shows
    the crops it comes from (``pack_image_features`` puts the base crop first; the grid's bilinear down-scaling mixes
    only the grid's crops, all numbered after the base): the image's smallest mark is view 0, a larger one view 1,
    the model's ``image_newline`` -1. A video row: view 0, its last token (the newline) -1."""
    vlm = model.model

    def mark(module, args, out):
        return torch.arange(1, out.shape[0] + 1, dtype=out.dtype).view(-1, 1, 1).expand_as(out).clone()

    extra = {"batch_num_images": inputs["batch_num_images"]} if "batch_num_images" in inputs else {}
    handle = vlm.multi_modal_projector.register_forward_hook(mark)
    try:
        with torch.no_grad():
            images = list(vlm.get_image_features(inputs["pixel_values"], inputs["image_sizes"], **extra).pooler_output)
    finally:
        handle.remove()
    counts, _ = _own_counts(model, inputs, spec)
    out = []
    for count, kind in zip(counts, [item[0] for sample in spec for item in sample]):
        if kind == "video":
            views = torch.zeros(count, dtype=torch.long)
            views[-1] = -1
            out.append(views)
            continue
        features = images.pop(0)  # (n, D)
        newline = (features == vlm.image_newline).all(-1)  # (n,)
        crop = features[:, 0]  # (n,) the crop mark
        views = torch.where(crop == crop[~newline].min(), 0, 1)
        views[newline] = -1
        out.append(views)
    return out


@pytest.mark.parametrize("name", BATCHES)
@pytest.mark.parametrize("recipe", ["prompt_cosine+critical+fps+pre_llm", "attention+critical+fps+schedule(layers=[1,3],ratio=0.5)"])
def test_view_index_marks_the_base_image_the_crops_and_the_newlines(model, batches, name, recipe):
    """``Signals.view_index`` at every drop: 0 at an image's base crop tokens, 1 at its (down-scaled) crop grid's, -1
    at newlines and padding; a multi-image sample's one-crop images are a base view and a newline; a video is view 0
    and its newline -1; after an earlier drop the present tokens keep their views."""
    inputs, spec = batches[name], SPECS[name]
    expected = _own_views(model, inputs, spec)
    assert any(bool((v == 1).any()) for v in expected) and any(bool((v == 0).any()) for v in expected)
    recorder = SignalRecorder(compose(recipe))
    with prune(model, recorder, budget=0.5) as handle:
        _forward(model, inputs)
    present = [torch.arange(v.numel()) for v in expected]
    drops = handle.last_selection.drops
    assert len(recorder.seen) == len(drops) == (2 if "schedule" in recipe else 1)
    for number, signals in enumerate(recorder.seen):
        for r, views in enumerate(expected):
            n = present[r].numel()
            assert signals.view_index[r, :n].tolist() == views[present[r]].tolist()
            assert bool((signals.view_index[r, n:] == -1).all())
        if number + 1 < len(drops):  # the next drop sees the tokens this one kept
            present = [drops[number].selection.row_indices(r) for r in range(len(expected))]
