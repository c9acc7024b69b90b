"""VTW and G-Prune end to end on the tiny LLaVA, against independent references (no vtprune code in them).

VTW (`vtw`, ``placement.withdraw``): the pruned forward and greedy decoding equal the unpruned model with every visual
token masked out of attention from layer k on (`masked_reference`), under ``keep`` (official) and ``compact``
positions; the text keeps its positions; a batch equals each sample alone; k = number of layers and a covering budget
reproduce the unpruned model bit for bit; the budget 0 is refused elsewhere. The calibration
(`experiments.vtw_calibration`) measures the KL of exactly that masked reference and picks the first k under the threshold.

G-Prune (`gprune`): each image keeps the tokens the official op order keeps on its projected features
(`gprune_reference`), and the model then equals the masked reference; batch == alone; keep-all. On the tiny LLaVA-NeXT
(the official code's own model) the kept set is the official two-graph block (`official_next_keep`: base image and
high-resolution crops as two graphs, every newline kept), which one graph over all tokens is not. On the tiny
LLaVA-OneVision (the same AnyRes packing, crop grids down-scaled past ``anyres_max``, one-crop images of a multi-image
sample, videos) each row keeps the official per-view set too: a cropped image the two-graph block, a one-crop image
and a video their one graph's top ``int(f * n_v)`` plus their newline.
"""

from __future__ import annotations

import pytest
import torch

from adapter_fixtures import (
    check_batch_equals_samples_alone,
    check_forward_and_generate,
    forward_logits,
    llava_inputs,
    llava_next_inputs,
    llava_onevision_inputs,
    masked_reference,
    merged_embeddings,
    record_hooks,
    sample_alone,
    single_thread,
    tiny_llava,
    tiny_llava_next,
    tiny_llava_onevision,
)
from gprune_reference import official_keep, official_keep_count, official_next_keep
from vtprune import framework
from vtprune.experiments.vtw_calibration import (
    OFFICIAL_FIRST_CANDIDATE,
    calibrate_withdraw_layer,
    official_candidates,
    withdrawal_kl,
)
from vtprune.framework.errors import BudgetError

LAYERS = 4
REGISTRY = framework.build_registry(autoload=False)

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def _vtw(k: int) -> str:
    return f"relevance.none+critical+diversity.none+budget.withdraw+placement.withdraw(k={k})"


@pytest.fixture(scope="module")
def case():
    model = tiny_llava(layers=LAYERS)
    inputs = llava_inputs(model, (1, 1), (5, 3), seed=2)  # two samples, left padded, one image each
    return model, inputs


def _image_positions(model, inputs) -> torch.Tensor:
    return inputs["input_ids"] == model.config.image_token_id  # (B, L)


def _alone(inputs):
    return [sample_alone(inputs, 0, 0, 1), sample_alone(inputs, 1, 1, 1)]


# -- VTW -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_vtw_equals_the_model_with_visual_tokens_masked_from_layer_k(case, k, positions) -> None:
    model, inputs = case
    result = check_forward_and_generate(model, inputs, _vtw(k), positions, kept_only=False, budget=0)
    assert [d.layer for d in result.drops] == [k] and result.counts.tolist() == [0, 0]
    image = _image_positions(model, inputs)
    kept_positions = [result.sequence_index[b][result.sequence_mask[b]] for b in range(2)]
    for b in range(2):  # the text goes on at its original positions; no image token is left
        assert kept_positions[b].tolist() == (~image[b]).nonzero().flatten().tolist()


def test_vtw_preset_is_the_withdraw_recipe(case) -> None:
    model, inputs = case
    with framework.prune(model, "vtw", budget=0, k=2, registry=REGISTRY):
        preset = forward_logits(model, inputs)
    with framework.prune(model, _vtw(2), budget=0, registry=REGISTRY):
        recipe = forward_logits(model, inputs)
    assert torch.equal(preset, recipe)
    assert framework.compose("vtw", registry=REGISTRY).placement.k == 15  # LLaVA-1.5-7B's k (official README)


def test_vtw_batch_equals_each_sample_alone(case) -> None:
    model, inputs = case
    alone = [(sample, 0) for sample in _alone(inputs)]
    check_batch_equals_samples_alone(model, inputs, _vtw(2), "keep", 0, alone)


def test_vtw_keeps_everything_at_the_last_layer_or_with_a_covering_budget(case) -> None:
    model, inputs = case
    base = forward_logits(model, inputs)
    base_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    for recipe, budget in ((_vtw(LAYERS), 0), (_vtw(2), 1.0), (_vtw(2), 10_000)):
        with framework.prune(model, recipe, budget=budget, registry=REGISTRY) as handle:
            out = forward_logits(model, inputs)
            gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert torch.equal(out, base) and torch.equal(gen, base_gen), (recipe, budget)
        if recipe == _vtw(LAYERS):
            assert handle.last_selection.drops == ()  # no layer runs after the drop
    with pytest.raises(ValueError, match=f"valid k: 1..{LAYERS}"):
        framework.prune(model, _vtw(LAYERS + 1), budget=0, registry=REGISTRY)


def test_zero_budget_is_refused_where_it_is_not_a_withdrawal(case) -> None:
    model, inputs = case
    before = record_hooks(model)
    for recipe in ("fastv", "gprune", "attention+critical+fps+layer(k=2)"):
        with pytest.raises(BudgetError, match="placement.withdraw"):
            framework.prune(model, recipe, budget=0, registry=REGISTRY)
    assert record_hooks(model) == before
    with framework.prune(model, "vtw", budget=6, k=2, registry=REGISTRY):  # VTW: 0 or all, no count between
        with pytest.raises(BudgetError, match="withdraw"):
            forward_logits(model, inputs)


# -- VTW calibration ---------------------------------------------------------------------------------------


def _masked_kl(model, samples, k: int) -> float:
    """Mean KL(withdrawn || full) at the last token, the withdrawal done by `masked_reference` (visual tokens masked
    out of attention from layer k on), written independently of vtprune."""
    total = 0.0
    for sample in samples:
        full = forward_logits(model, sample)[:, -1].float()
        image = sample["input_ids"] == model.config.image_token_id
        removed = [image if layer >= k else torch.zeros_like(image) for layer in range(LAYERS)]
        with masked_reference(model, removed):
            withdrawn = forward_logits(model, sample)[:, -1].float()
        p_withdrawn = withdrawn.softmax(-1)
        total += float((p_withdrawn * (p_withdrawn.log() - full.log_softmax(-1))).sum(-1).mean())
    return total / len(samples)


def test_calibration_measures_the_masked_reference_and_picks_the_first_layer_under_the_threshold(case) -> None:
    model, inputs = case
    samples = _alone(inputs)
    before = record_hooks(model)
    candidates = list(range(1, LAYERS + 1))
    noise = 1e-6  # k = LAYERS: the same logits; kl_div's log(softmax) vs log_softmax leaves ~1e-7 of float noise
    found = calibrate_withdraw_layer(model, samples, candidates, threshold=noise, registry=REGISTRY)
    assert record_hooks(model) == before  # nothing stays attached
    assert list(found.mean_kl) == candidates
    for k in candidates:
        torch.testing.assert_close(found.mean_kl[k], _masked_kl(model, samples, k), rtol=1e-4, atol=1e-7)
    assert found.mean_kl[LAYERS] <= noise and found.layer == LAYERS  # withdrawing after the last layer changes nothing
    assert all(found.mean_kl[k] > noise for k in candidates[:-1])
    for threshold in sorted(found.mean_kl.values()):
        chosen = calibrate_withdraw_layer(model, samples, candidates, threshold, registry=REGISTRY)
        assert chosen.layer == next(k for k in candidates if found.mean_kl[k] <= threshold)
    assert calibrate_withdraw_layer(model, samples, candidates[:-1], threshold=noise, registry=REGISTRY).layer is None
    with pytest.raises(ValueError, match="threshold"):
        calibrate_withdraw_layer(model, samples, candidates, threshold=-1.0, registry=REGISTRY)


def test_withdrawal_kl_is_the_official_kldivloss_and_the_official_candidates() -> None:
    generator = torch.Generator().manual_seed(0)
    full, withdrawn = torch.randn(3, 50, generator=generator), torch.randn(3, 50, generator=generator)
    official = torch.nn.KLDivLoss(reduction="batchmean")(torch.log_softmax(full, dim=1), torch.softmax(withdrawn, dim=1))
    assert withdrawal_kl(full, withdrawn) == float(official)
    assert list(official_candidates(32)) == list(range(OFFICIAL_FIRST_CANDIDATE, 32)) and OFFICIAL_FIRST_CANDIDATE == 5


# -- G-Prune -----------------------------------------------------------------------------------------------


def test_gprune_keeps_the_official_set_and_equals_the_masked_reference(case) -> None:
    model, inputs = case
    result = check_forward_and_generate(model, inputs, "gprune", "keep", kept_only=False, budget=0.5)
    embeds = merged_embeddings(model, inputs)
    image = _image_positions(model, inputs)
    for b in range(2):
        features = embeds[b, image[b]]  # (n, D) the projector output of sample b's image
        want = official_keep(features.clone(), official_keep_count(0.5, features.shape[0]))
        assert result.selection.row_indices(b).tolist() == want


def test_gprune_batch_equals_each_sample_alone_and_keep_all(case) -> None:
    model, inputs = case
    alone = [(sample, 0.5) for sample in _alone(inputs)]
    check_batch_equals_samples_alone(model, inputs, "gprune", "keep", 0.5, alone)
    base = forward_logits(model, inputs)
    with framework.prune(model, "gprune", budget=1.0, registry=REGISTRY):
        assert torch.equal(forward_logits(model, inputs), base)


@pytest.fixture(scope="module")
def next_case():
    model = tiny_llava_next(layers=LAYERS)
    sizes = (((30, 50),), ((50, 30),), ((28, 28),))  # a wide, a tall and a square image: different crop grids
    return model, llava_next_inputs(model, image_sizes=sizes, question_lengths=(5, 3, 4), seed=1)


def _next_official(model, inputs, budget: float) -> list[list[int]]:
    """Per sample (one image each), the official LLaVA-NeXT block's kept positions among the image's tokens; the part
    structure from the model alone: the base image is the tower's patches per crop, newlines are ``image_newline``."""
    embeds = merged_embeddings(model, inputs)
    image = _image_positions(model, inputs)
    vision = model.config.vision_config
    base = (vision.image_size // vision.patch_size) ** 2
    out = []
    for b in range(inputs["input_ids"].shape[0]):
        features = embeds[b, image[b]]  # (n, D)
        rows = int((features == model.model.image_newline).all(-1).sum())
        cols = (features.shape[0] - base) // rows - 1
        out.append(official_next_keep(features.clone(), base, rows, cols, keep_ratio=budget))
    return out


def test_gprune_on_llava_next_keeps_the_official_two_graph_set_and_equals_the_masked_reference(next_case) -> None:
    model, inputs = next_case
    result = check_forward_and_generate(model, inputs, "gprune", "keep", kept_only=False, budget=0.5)
    embeds = merged_embeddings(model, inputs)
    image = _image_positions(model, inputs)
    for b, want in enumerate(_next_official(model, inputs, 0.5)):
        assert result.selection.row_indices(b).tolist() == want
        features = embeds[b, image[b]]
        one_graph = official_keep(features.clone(), official_keep_count(0.5, features.shape[0]))
        assert one_graph != want  # the single graph over every token is not the official set


def test_gprune_on_llava_next_compact_positions_equal_the_kept_only_model(next_case) -> None:
    model, inputs = next_case
    result = check_forward_and_generate(model, inputs, "gprune", "compact", kept_only=True, budget=0.3)
    for b, want in enumerate(_next_official(model, inputs, 0.3)):
        assert result.selection.row_indices(b).tolist() == want


def test_gprune_on_llava_next_batch_equals_each_sample_alone_and_keep_all(next_case) -> None:
    model, inputs = next_case
    alone = [(sample_alone(inputs, b, b, 1), 0.5) for b in range(3)]
    check_batch_equals_samples_alone(model, inputs, "gprune", "keep", 0.5, alone)
    base = forward_logits(model, inputs)
    with framework.prune(model, "gprune", budget=1.0, registry=REGISTRY):
        assert torch.equal(forward_logits(model, inputs), base)


def test_gprune_on_llava_next_int_budget_keeps_the_newlines_first(next_case) -> None:
    model, inputs = next_case
    image = _image_positions(model, inputs)
    embeds = merged_embeddings(model, inputs)
    with framework.prune(model, "gprune", budget=12, registry=REGISTRY) as handle:
        forward_logits(model, inputs)
    for b in range(3):
        newline = (embeds[b, image[b]] == model.model.image_newline).all(-1).nonzero().flatten()  # (R,)
        kept = set(handle.last_selection.selection.row_indices(b).tolist())
        assert len(kept) == 12 and set(newline.tolist()) <= kept


# -- G-Prune on LLaVA-OneVision (view_index from the OneVision adapter) ----------------------------------------

#: sample 0: one image, cropped, its 8x8 grid down-scaled to 5x5 (anyres_max_2); sample 1: two one-crop images
#: (batch_num_images); then a batch of videos and cropped images
OV_IMAGES = ((("image", (56, 56)),), (("image", (30, 50)), ("image", (28, 28))))
OV_VIDEO = ((("video",), ("image", (30, 50))), (("image", (56, 28)), ("video",)))


@pytest.fixture(scope="module")
def onevision_case():
    model = tiny_llava_onevision(layers=LAYERS)
    return model, {
        "images": (llava_onevision_inputs(model, OV_IMAGES, question_lengths=(5, 3)), OV_IMAGES),
        "video": (llava_onevision_inputs(model, OV_VIDEO, question_lengths=(3, 6), batch_num_images=False, seed=1), OV_VIDEO),
    }


def _onevision_rows(model, inputs, spec) -> list[tuple[str, torch.Tensor]]:
    """(kind, (n, D) decoder input embeddings) of every image / video row in sequence order, cut from the merged
    embeddings by the lengths of the model's own image / video features."""
    vlm = model.model
    with torch.no_grad():
        embeds = merged_embeddings(model, inputs)
        extra = {"batch_num_images": inputs["batch_num_images"]} if "batch_num_images" in inputs else {}
        images = [int(f.shape[0]) for f in vlm.get_image_features(inputs["pixel_values"], inputs["image_sizes"], **extra).pooler_output]
        videos = []
        if "pixel_values_videos" in inputs:
            videos = [int(f.shape[0]) for f in vlm.get_video_features(inputs["pixel_values_videos"]).pooler_output]
    ids = inputs["input_ids"]
    rows = []
    for b, sample in enumerate(spec):
        visual = ((ids[b] == model.config.image_token_id) | (ids[b] == model.config.video_token_id)).nonzero().flatten()
        start = 0
        for item in sample:
            count = images.pop(0) if item[0] == "image" else videos.pop(0)
            rows.append((item[0], embeds[b, visual[start : start + count]]))
            start += count
    return rows


def _onevision_official(model, rows, budget: float) -> list[list[int]]:
    """Per row, the official per-view kept positions: a cropped image (base crop, then rows of crops + a newline)
    the LLaVA-NeXT two-graph block; a one-crop image (base crop + newline) and a video (frames + newline), for which
    the official block does not run, their one graph's ``int(f * n)`` best plus the newline."""
    vision = model.config.vision_config
    base = (vision.image_size // vision.patch_size) ** 2
    out = []
    for kind, features in rows:
        newline = (features == model.model.image_newline).all(-1)  # (n,)
        n, lines = features.shape[0], int(newline.sum())
        if kind == "image" and n > base + 1:
            cols = (n - base) // lines - 1
            out.append(official_next_keep(features.clone(), base, lines, cols, keep_ratio=budget))
            continue
        assert newline.nonzero().flatten().tolist() == [n - 1]
        body = features[: n - 1]
        out.append(sorted(official_keep(body.clone(), official_keep_count(budget, n - 1)) + [n - 1]))
    return out


@pytest.mark.parametrize("name", ["images", "video"])
def test_gprune_on_llava_onevision_keeps_the_official_per_view_sets_and_equals_the_masked_reference(onevision_case, name) -> None:
    model, batches = onevision_case
    inputs, spec = batches[name]
    result = check_forward_and_generate(model, inputs, "gprune", "keep", kept_only=False, budget=0.5)
    rows = _onevision_rows(model, inputs, spec)
    wants = _onevision_official(model, rows, 0.5)
    assert result.counts.tolist() == [len(w) for w in wants]
    vision = model.config.vision_config
    one_crop = (vision.image_size // vision.patch_size) ** 2 + 1  # a base crop and its newline
    for r, ((kind, features), want) in enumerate(zip(rows, wants)):
        assert result.selection.row_indices(r).tolist() == want
        if kind == "image" and features.shape[0] > one_crop:  # a cropped image: one graph over all tokens differs
            assert official_keep(features.clone(), official_keep_count(0.5, features.shape[0])) != want


def test_gprune_on_llava_onevision_keep_all(onevision_case) -> None:
    model, batches = onevision_case
    for inputs, _ in batches.values():
        base = forward_logits(model, inputs)
        with framework.prune(model, "gprune", budget=1.0, registry=REGISTRY):
            assert torch.equal(forward_logits(model, inputs), base)


# -- VTW on Qwen2-VL (M-RoPE positions, images and a video) ------------------------------------------------------


@pytest.mark.parametrize("positions", ["keep", "compact"])
def test_vtw_on_qwen2_vl_equals_the_masked_reference(positions) -> None:
    from qwen_fixtures import WITH_VIDEO, MaskedReference, aligned, batch, kept_mask, logits, tiny_qwen

    model = tiny_qwen("qwen2_vl")  # 3 decoder layers
    inputs, layouts = batch(WITH_VIDEO)
    length = inputs["input_ids"].shape[1]
    with framework.prune(model, _vtw(2), budget=0, positions=positions, registry=REGISTRY) as handle:
        pruned = logits(model, inputs)
        result = handle.last_selection
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert bool((result.counts == 0).all())
    keep = kept_mask(result, inputs, layouts)  # the text only
    reference = MaskedReference(model, inputs, keep, 2, compact=positions == "compact")
    ours, theirs = aligned(pruned, reference.logits(), keep)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    tokens, _ = reference.generate(4)
    assert torch.equal(generated[:, length:], tokens)
