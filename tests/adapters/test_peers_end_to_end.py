"""Every registered preset, end to end on the tiny LLaVA and LLaVA-NeXT (generated from the registry).

For each (preset, adapter): if the adapter provides the preset's signals at its placement, prune + forward +
greedy generate work, the first drop keeps exactly the budget, keep-all is bit-identical to the unpruned
model (LLaVA-NeXT at ``vision``: equal to the model with its newline tokens masked out, which is what
``vision`` does by design) and a batch of two samples equals each sample alone. Otherwise ``framework.prune``
raises a `VtpruneError` naming the missing signal or placement, before any hook is installed.

Then the faithfulness rules the adapters implement for the peers: VisionZip ``keep_cls`` (CLS in front,
official order, merged values through the projector), DART's final norm, PyramidDrop's own-layer scoring,
VisPruner's CLS attention (head mean).
"""

from __future__ import annotations

import pytest
import torch

from adapter_fixtures import (
    keep_all_params,
    SignalRecorder,
    IMAGE_TOKEN_ID,
    llava_inputs,
    llava_next_inputs,
    lm_inputs_recorder,
    masked_reference,
    record_hooks,
    removed_by_layer,
    save_tiny_clip,
    single_thread,
    tiny_llava,
    tiny_llava_next,
    tiny_tokenizer,
)
from vtprune import framework
from vtprune.framework.errors import BudgetError, VtpruneError
from vtprune.framework.support import support_problems
from vtprune.framework.prune import adapter_for

REGISTRY = framework.build_registry(autoload=False)
PRESETS = sorted(REGISTRY.presets)
ADAPTERS = ("llava", "llava_next")
BUDGET = 6
ATOL = 1e-5

#: Presets whose kept count is adaptive and that need parameters at BUDGET (SparseVLM's official scale/bias exist for
#: 192 / 128 / 64 only): their pruned run uses these; keep-all runs without them (a budget covering every token).
ADAPTIVE_OPTIONS = {"sparsevlm": {"scale": 0.8, "bias": 0.0}}

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def _layers_needed() -> int:
    """Enough decoder layers for every preset's default drops (PyramidDrop drops before layer 24)."""
    deepest = 1
    for name in PRESETS:
        for drop in framework.compose(name, registry=REGISTRY).placement.drops(0.5):
            deepest = max(deepest, drop.layer or 0)
    return deepest + 1


LAYERS = _layers_needed()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    llava = tiny_llava(layers=LAYERS)
    nxt = tiny_llava_next(layers=LAYERS)
    clip_path = save_tiny_clip(llava, tmp_path_factory.mktemp("clip"))
    out = {}
    for key, model, inputs in (
        ("llava", llava, llava_inputs(llava, (1, 1), (5, 3), seed=2)),
        ("llava_next", nxt, llava_next_inputs(nxt, (((30, 50),), ((50, 30),)), (5, 3), seed=2)),
    ):
        with torch.no_grad():
            base = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        out[key] = dict(model=model, inputs=inputs, base=base, gen=gen, options={})
    out["llava"]["options"] = {"clip_model": clip_path, "tokenizer": tiny_tokenizer()}
    return out


def _supported(preset: str, model) -> bool:
    """The framework's one support check (drop kinds and signals per kind; a `decode` placement is supported where
    its prefill placement is): the cases below then show that what it accepts runs and what it refuses raises."""
    pipeline = framework.compose(preset, registry=REGISTRY)
    return not support_problems(adapter_for(model, REGISTRY), pipeline)


def _adaptive(preset: str) -> bool:
    """Presets whose kept count comes from the data (an allocator with ``adaptive_counts``)."""
    return bool(getattr(framework.compose(preset, registry=REGISTRY).budget, "adaptive_counts", False))


def _options(case, preset):
    pipeline = framework.compose(preset, registry=REGISTRY)
    return case["options"] if pipeline.requires & {"clip_visual", "clip_text"} else {}


def _sample(inputs, b):
    """Sample b alone (padding removed), with its own image(s)."""
    real = inputs["attention_mask"][b].bool()
    alone = {"input_ids": inputs["input_ids"][b : b + 1, real], "attention_mask": inputs["attention_mask"][b : b + 1, real]}
    alone["pixel_values"] = inputs["pixel_values"][b : b + 1]
    if "image_sizes" in inputs:
        alone["image_sizes"] = inputs["image_sizes"][b : b + 1]
    return alone


def _crops_and_newlines(model, inputs) -> tuple[list[int], list[int]]:
    """Per LLaVA-NeXT image: its AnyRes crops and its newline tokens (the model's own packing of ones)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    sizes = inputs["image_sizes"]
    crops = [image_size_to_num_patches(s, config.image_grid_pinpoints, config.vision_config.image_size) for s in sizes.tolist()]
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    ones = torch.ones(sum(crops), patches, 1)
    packed, _ = model.model.pack_image_features(list(ones.split(crops)), sizes, "default", image_newline=torch.zeros(1))
    return crops, [int((p == 0).sum()) for p in packed]


def _check_keep_all(case, preset, adapter, keep_all, options):
    """A budget covering every token reproduces the unpruned model bit for bit (every preset, adaptive too)."""
    model, inputs = case["model"], case["inputs"]
    with framework.prune(model, preset, budget=10_000, registry=REGISTRY, **keep_all, **options) as handle:
        with torch.no_grad():
            out = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    result = handle.last_selection
    if adapter == "llava_next" and result.drops[0].where == "vision":
        # newline tokens have no vision feature: `vision` never keeps them (docs/adapters.md)
        removed = removed_by_layer(result, *inputs["input_ids"].shape, LAYERS)
        assert int(removed[0].sum()) == int((result.num_tokens - result.counts).sum()) > 0
        with masked_reference(model, removed), torch.no_grad():
            reference = model(**inputs).logits
        real = result.sequence_mask & inputs["attention_mask"].bool().gather(1, result.sequence_index)
        want = reference.gather(1, result.sequence_index.unsqueeze(-1).expand(-1, -1, reference.shape[-1]))
        torch.testing.assert_close(out[real], want[real], atol=ATOL, rtol=0)
    else:
        assert result.counts.tolist() == result.num_tokens.tolist()
        assert torch.equal(out, case["base"])
        assert torch.equal(gen, case["gen"])


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_end_to_end(models, preset, adapter):
    case = models[adapter]
    model, inputs = case["model"], case["inputs"]
    if not _supported(preset, model):
        before = record_hooks(model)
        with pytest.raises(VtpruneError) as error:
            framework.prune(model, preset, budget=BUDGET, registry=REGISTRY)
        pipeline = framework.compose(preset, registry=REGISTRY)
        message = str(error.value)
        assert pipeline.placement.name in message or any(s in message for s in pipeline.requires)
        assert record_hooks(model) == before
        return
    options = _options(case, preset)
    keep_all = keep_all_params(framework.compose(preset, registry=REGISTRY))
    length = inputs["input_ids"].shape[1]

    # pruned forward + generate; the first drop keeps exactly the budget (an adaptive preset: its own count,
    # or a clear BudgetError for a budget it has no setting for, e.g. SparseVLM's official 64 / 128 / 192)
    before = record_hooks(model)
    pruned_options = {**options, **ADAPTIVE_OPTIONS.get(preset, {})}
    # an allocator that keeps no token short of keep-all (VTW's withdraw) runs at its setting, the budget 0
    withdraws = not framework.compose(preset, registry=REGISTRY).budget.keeps_tokens
    budget = 0 if withdraws else BUDGET
    if _adaptive(preset):
        try:
            with framework.prune(model, preset, budget=BUDGET, registry=REGISTRY, **pruned_options), torch.no_grad():
                model(**inputs)
        except BudgetError as error:
            assert "budget" in str(error)
            assert record_hooks(model) == before
            _check_keep_all(case, preset, adapter, keep_all, options)
            return
    with framework.prune(model, preset, budget=budget, registry=REGISTRY, **pruned_options) as handle:
        with torch.no_grad():
            out = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        result = handle.last_selection
        first = result.drops[0].counts
        if _adaptive(preset):
            assert bool((first > 0).all()) and bool((first <= result.num_tokens).all())
        elif adapter == "llava_next" and result.drops[0].where == "vision_layers":
            # ToMe per AnyRes crop inside the tower: the budget is per crop (docs/methods.md "ToMe"), so each image
            # keeps at most BUDGET merged tokens per crop (fewer where the unpadding cut them), plus its newlines
            crops, newlines = _crops_and_newlines(model, inputs)
            assert all(newlines[r] < int(first[r]) <= BUDGET * crops[r] + newlines[r] for r in range(2))
        else:
            assert first.tolist() == [budget, budget]
        assert out.shape[1] < length and torch.isfinite(out).all()
        assert gen.shape[1] == length + 4
        # batch of two == each sample alone
        for b in range(2):
            alone = _sample(inputs, b)
            with torch.no_grad():
                single = model(**alone).logits
            single_gen = model.generate(**alone, max_new_tokens=4, do_sample=False)
            assert handle.last_selection.counts.tolist() == result.counts[b : b + 1].tolist()
            n = single.shape[1]
            torch.testing.assert_close(out[b, -n:], single[0], atol=ATOL, rtol=0)
            assert torch.equal(gen[b, length:], single_gen[0, -4:])

    _check_keep_all(case, preset, adapter, keep_all, options)


def test_cdpruner_without_clip_model_is_a_clear_error(models):
    model = models["llava"]["model"]
    before = record_hooks(model)
    with pytest.raises(VtpruneError, match="clip_model"):
        framework.prune(model, "cdpruner", budget=BUDGET, registry=REGISTRY)
    assert record_hooks(model) == before


# ---------------------------------------------------------------------------------------------------------
# Faithfulness of the signals the adapters give the peers
# ---------------------------------------------------------------------------------------------------------




def _image_positions(inputs, b):
    return (inputs["input_ids"][b] == IMAGE_TOKEN_ID).nonzero().flatten()


@pytest.mark.parametrize("keep_cls", [True, False])
def test_visionzip_llm_sees_cls_then_dominant_then_merged_contextual(models, keep_cls):
    from vtprune.strategies.functional import visionzip_select

    case = models["llava"]
    model, inputs = case["model"], case["inputs"]
    budget = 7  # 6 dominant + 1 contextual patches (+ CLS)
    with framework.prune(
        model, "visionzip", budget=budget, dominant=6, contextual=1, keep_cls=keep_cls, registry=REGISTRY
    ) as handle, torch.no_grad():
        seen, hook = lm_inputs_recorder(model)  # registered after the adapter's hooks: sees the compacted input
        try:
            model(**inputs)
        finally:
            hook.remove()
    record = handle.last_selection.drops[0]
    embeds = seen[-1]
    with torch.no_grad():
        vision = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=False)
    hidden = vision.hidden_states[-2]  # (images, 1 + n, Dv)
    keys = _vision_keys(model, vision.hidden_states)
    cls_attention = _cls_rows(model, vision.hidden_states)
    keep, values, dominant = visionzip_select(hidden[:, 1:].float(), cls_attention, keys, dominant=6, contextual=1)
    for b in range(2):
        kept = keep[b].nonzero().flatten()
        order = torch.cat([kept[dominant[b, kept]], kept[~dominant[b, kept]]])  # official: dominant, contextual
        sequence = values[b, order]
        if keep_cls:
            sequence = torch.cat([hidden[b, :1].float(), sequence])
            assert record.counts[b] == budget + 1
            assert record.patches.row_indices(b).tolist() == kept.tolist()
        else:
            sequence = values[b, kept]  # framework order: ascending
            assert record.counts[b] == budget
        with torch.no_grad():
            want = model.model.multi_modal_projector(sequence)
        image = inputs["input_ids"][b] == IMAGE_TOKEN_ID
        slots = handle.last_selection.sequence_index[b]
        got = embeds[b][image.gather(0, slots) & handle.last_selection.sequence_mask[b]]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _vision_layer(model, index=-2):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers[index]


def _vision_keys(model, hidden_states):
    """Key states of the feature layer (whose output is hidden_states[-2]; its input is hidden_states[-3])."""
    layer = _vision_layer(model)
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden_states[-3])
    heads = model.config.vision_config.num_attention_heads
    keys = attn.k_proj(normed).view(normed.shape[0], normed.shape[1], heads, -1)
    return keys[:, 1:].float()


def _cls_rows(model, hidden_states):
    layer = _vision_layer(model)
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden_states[-3])
    heads = model.config.vision_config.num_attention_heads
    q = attn.q_proj(normed[:, :1]).view(normed.shape[0], 1, heads, -1).transpose(1, 2)
    k = attn.k_proj(normed).view(normed.shape[0], normed.shape[1], heads, -1).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(2, 3) * attn.scale, dim=-1, dtype=torch.float32)[:, :, 0]
    return probs[:, :, 1:]


def test_dart_similarities_use_the_final_norm(models):
    case = models["llava"]
    model, inputs = case["model"], case["inputs"]
    spy = SignalRecorder(framework.compose("dart", registry=REGISTRY))
    with framework.prune(model, spy, budget=BUDGET), torch.no_grad():
        model(**inputs)
    with torch.no_grad():
        full = model(**inputs, output_hidden_states=True).hidden_states[2]  # input of layer 2 (unpruned)
        normed = model.model.language_model.norm(full)
    signals = spy.seen[0]
    for b in range(2):
        positions = _image_positions(inputs, b)
        torch.testing.assert_close(signals.visual[b, : positions.numel()], normed[b, positions].float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("preset, offset", [("pdrop", 0), ("fastv", 1)])
def test_attention_scoring_layer(models, preset, offset):
    """PyramidDrop scores a drop before layer k with layer k's own q/k (eager attentions[k]); FastV with layer
    k-1's (attentions[k-1])."""
    case = models["llava"]
    model, inputs = case["model"], case["inputs"]
    pipeline = framework.compose(preset, registry=REGISTRY)
    k = pipeline.placement.drops(BUDGET)[0].layer
    spy = SignalRecorder(pipeline)
    with framework.prune(model, spy, budget=BUDGET), torch.no_grad():
        model(**inputs)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    signals = spy.seen[0]
    query = inputs["input_ids"].shape[1] - 1
    for b in range(2):
        positions = _image_positions(inputs, b)
        want = attentions[k - offset][b, :, query, positions]
        torch.testing.assert_close(signals.attention[b, :, : positions.numel()], want, atol=1e-6, rtol=0)


def test_vispruner_uses_head_mean_cls_attention_at_vision(models):
    from vtprune.strategies.functional import vispruner_select

    case = models["llava"]
    model, inputs = case["model"], case["inputs"]
    with framework.prune(model, "vispruner", budget=8, registry=REGISTRY) as handle, torch.no_grad():
        model(**inputs)
        vision = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    cls_attention = _cls_rows(model, vision.hidden_states)
    features = vision.hidden_states[-2][:, 1:].float()
    keep, _ = vispruner_select(features, cls_attention, torch.tensor([8, 8]))
    for b in range(2):
        assert handle.last_selection.selection.row_indices(b).tolist() == keep[b].nonzero().flatten().tolist()
