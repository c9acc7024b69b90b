"""LLaVA-1.5 adapter: pruned forwards and generation equal independent references (tiny random models)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from adapter_fixtures import (
    PLACEMENT_RECIPES,
    aligned,
    generation_positions,
    kept_only_inputs,
    llava_inputs,
    masked_reference,
    record_hooks,
    removed_by_layer,
    sample_alone,
    single_thread,
    tiny_llava,
)
from adapter_fixtures import forward_logits as _forward
from vtprune import framework
from vtprune.framework.errors import RegistrationError
from vtprune.framework.prune import prune
from vtprune.framework.selection import selection_from_masks
from vtprune.framework.stages import Drop

ATOL = 1e-5
RECIPES = PLACEMENT_RECIPES
PLACEMENTS = list(RECIPES)


_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.fixture(scope="module")
def eager_model():
    return tiny_llava(attn="eager")


@pytest.fixture(scope="module")
def inputs(model):
    return llava_inputs(model, images_per_sample=(1, 2), question_lengths=(5, 3))


def _with_positions(inputs):
    return {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}


# ---------------------------------------------------------------------------------------------------------
# A tiny duck-typed pipeline (any object with select / requires / placement works with prune)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Placement:
    name: str
    layers: tuple = ()

    def drops(self, budget):
        if self.name == "schedule":
            return (Drop("layer", self.layers[0], budget), *(Drop("layer", k, 0.5) for k in self.layers[1:]))
        if self.name == "layer":
            return (Drop("layer", self.layers[0], budget),)
        return (Drop(self.name, None, budget),)


class TopSignal:
    """Keeps the tokens with the largest head-mean of one signal; records every `Signals` it sees."""

    def __init__(self, field: str, placement: _Placement):
        self.field = field
        self.placement = placement
        self.requires = frozenset({"visual", field})
        self.seen = []

    def select(self, signals, budget):
        self.seen.append(signals)
        values = getattr(signals, self.field)
        if self.field in ("attention", "cls_attention"):
            score = values.float().mean(dim=1)  # (B, N) head mean
        else:
            score = signals.visual.float().norm(dim=-1)
        valid = signals.valid()
        score = score.masked_fill(~valid, float("-inf"))
        counts = valid.sum(1)
        if isinstance(budget, (list, tuple)):
            wanted = torch.tensor([b if isinstance(b, int) else max(1, round(b * int(c))) for b, c in zip(budget, counts)])
        elif isinstance(budget, int):
            wanted = torch.full_like(counts, budget)
        else:
            wanted = (counts.double() * budget).round().long().clamp(min=1)
        wanted = torch.minimum(wanted, counts)
        order = score.argsort(dim=1, descending=True)
        rank = order.argsort(dim=1)
        keep = (rank < wanted.unsqueeze(1)) & valid
        return selection_from_masks(keep, keep)


# ---------------------------------------------------------------------------------------------------------
# Keep-all is bit-identical
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_keep_all_is_bit_identical(model, inputs, placement):
    base = _forward(model, inputs)
    base_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    recipe = RECIPES[placement].replace("ratio=0.5", "ratio=1.0")  # a schedule keeps all only with ratio 1
    with prune(model, recipe, budget=1000) as handle:
        out = _forward(model, inputs)
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, base)
    assert torch.equal(gen, base_gen)
    assert handle.last_selection.counts.tolist() == [16, 16, 16]


# ---------------------------------------------------------------------------------------------------------
# Pruned forward == independent reference
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_pruned_forward_matches_reference(model, inputs, placement, positions):
    feed = _with_positions(inputs)
    with prune(model, RECIPES[placement], budget=5, positions=positions) as handle:
        out = _forward(model, feed)
    result = handle.last_selection
    batch, length = inputs["input_ids"].shape
    layers = model.config.text_config.num_hidden_layers
    removed = removed_by_layer(result, batch, length, layers)
    assert out.shape[1] == result.sequence_index.shape[1] < length
    if placement == "schedule":
        assert result.per_layer_counts[1].tolist() == [5, 5, 5]
        assert result.per_layer_counts[3].tolist() == [3, 3, 3]
    else:
        assert result.counts.tolist() == [5, 5, 5]
    if positions == "compact" and placement in ("pre_llm", "vision"):
        # the model fed only the kept tokens
        reference_inputs = kept_only_inputs(model, inputs, removed[0])
        reference = _forward(model, reference_inputs)
        real = result.sequence_mask & inputs["attention_mask"].bool().gather(1, result.sequence_index)
        torch.testing.assert_close(out[real], reference[reference_inputs["attention_mask"].bool()], atol=ATOL, rtol=0)
    else:
        with masked_reference(model, removed, positions):
            reference = _forward(model, feed)
        got, want = aligned(out, result, reference, inputs["attention_mask"])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_generate_matches_reference_and_cache_holds_kept_tokens(model, inputs, placement, positions):
    with prune(model, RECIPES[placement], budget=4, positions=positions) as handle:
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    result = handle.last_selection
    batch, length = inputs["input_ids"].shape
    layers = model.config.text_config.num_hidden_layers
    removed = removed_by_layer(result, batch, length, layers)
    new_tokens = out.sequences[:, length:]
    # cache: layers after a drop hold only the kept slots (+ generated tokens), earlier layers the full prompt
    for number in range(layers):
        drops = [d.layer for d in result.drops if d.layer <= number]
        expected = length + 7
        if drops:
            expected = int((~removed[number]).sum(1).max()) + 7  # kept slots of the fullest row
        assert out.cache.layers[number].keys.shape[-2] == expected
    assert out.cache.layers[layers - 1].keys.shape[-2] < length
    if positions == "compact" and placement in ("pre_llm", "vision"):
        reference_inputs = kept_only_inputs(model, inputs, removed[0])
        reference_inputs.pop("position_ids")
        ref = model.generate(**reference_inputs, max_new_tokens=8, do_sample=False)
        assert torch.equal(new_tokens, ref[:, -8:])
    else:
        with masked_reference(model, removed, positions):
            ref = model.generate(
                **inputs,
                position_ids=generation_positions(inputs["attention_mask"]),
                max_new_tokens=8,
                do_sample=False,
            )
        assert torch.equal(new_tokens, ref[:, length:])


# ---------------------------------------------------------------------------------------------------------
# Batch == each sample alone (left padding, different images and budgets)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_batch_equals_samples_alone(model, placement, positions):
    inputs = llava_inputs(model, images_per_sample=(2, 1), question_lengths=(3, 6), seed=3)
    budgets = [3, 6, 9]  # one per image
    feed = _with_positions(inputs)
    with prune(model, RECIPES[placement], budget=budgets, positions=positions) as handle:
        out = _forward(model, feed)
        batch_counts = handle.last_selection.counts.tolist()
        gen = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        singles = []
        for b, (first, count) in enumerate(((0, 2), (2, 1))):
            alone = sample_alone(inputs, b, first, count)
            handle.budget = budgets[first : first + count]
            single = _forward(model, alone)
            single_gen = model.generate(**alone, max_new_tokens=5, do_sample=False)
            singles.append((single, single_gen, handle.last_selection.counts.tolist()))
    assert batch_counts == [3, 6, 9] or placement == "schedule"
    length = inputs["input_ids"].shape[1]
    for b, (single, single_gen, counts) in enumerate(singles):
        n = single.shape[1]
        torch.testing.assert_close(out[b, -n:], single[0], atol=ATOL, rtol=0)
        assert torch.equal(gen[b, length:], single_gen[0, -5:])


# ---------------------------------------------------------------------------------------------------------
# sdpa == eager, recomputed attention row == eager attention, fp16 / bf16
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_sdpa_equals_eager(model, eager_model, inputs, placement):
    feed = _with_positions(inputs)
    with prune(model, RECIPES[placement], budget=5) as sdpa_handle:
        sdpa = _forward(model, feed)
    with prune(eager_model, RECIPES[placement], budget=5) as eager_handle:
        eager = _forward(eager_model, feed)
    result = sdpa_handle.last_selection
    assert torch.equal(result.selection.indices, eager_handle.last_selection.selection.indices)
    real = result.sequence_mask & inputs["attention_mask"].bool().gather(1, result.sequence_index)
    torch.testing.assert_close(sdpa[real], eager[real], atol=ATOL, rtol=0)  # filler / pad slots are garbage


@pytest.mark.parametrize("k", [1, 3])
def test_recomputed_attention_row_equals_eager_attention(model, eager_model, inputs, k):
    feed = _with_positions(inputs)
    with torch.no_grad():
        eager_out = eager_model(**feed, output_attentions=True)
    for m in (model, eager_model):
        pipeline = TopSignal("attention", _Placement("layer", (k,)))
        with prune(m, pipeline, budget=1000):
            _forward(m, feed)
        signals = pipeline.seen[-1]
        attention = eager_out.attentions[k - 1]  # (B, H, L, L)
        for r, (b, positions) in enumerate(zip([0, 1, 1], _image_positions(inputs))):
            query = int(_last_prompt(inputs, b))
            want = attention[b, :, query, positions]
            got = signals.attention[r, :, : positions.numel()]
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        assert signals.attention.dtype == torch.float32
        assert signals.visual_keys is None


def _image_positions(inputs):
    ids = inputs["input_ids"]
    out = []
    for b in range(ids.shape[0]):
        pos = (ids[b] == 95).nonzero().flatten()
        out.extend(pos.split(16))
    return out


def _last_prompt(inputs, b):
    ids = inputs["input_ids"][b]
    return ids.shape[0] - 1  # the prompt runs to the end of the input (no prompt_stop)


def test_prompt_stop_excludes_assistant_marker(model, inputs):
    pipeline = TopSignal("prompt", _Placement("pre_llm"))
    with prune(model, pipeline, budget=4, prompt_stop=[41, 42]):
        _forward(model, inputs)
    with_stop = pipeline.seen[-1].prompt_mask.sum(1).tolist()
    with prune(model, pipeline, budget=4):
        _forward(model, inputs)
    without = pipeline.seen[-1].prompt_mask.sum(1).tolist()
    assert [w - s for w, s in zip(without, with_stop)] == [2, 2, 2]
    assert with_stop == [6, 4, 4]  # separator after the last image + the question of each image's sample


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_half_precision_models_run(dtype, placement):
    half = tiny_llava(dtype=dtype)
    inputs = llava_inputs(half, images_per_sample=(1, 2))
    pipeline = framework.compose(RECIPES[placement])
    seen = []
    original = pipeline.select

    class Spy:
        requires = pipeline.requires
        placement = pipeline.placement

        def select(self, signals, budget):
            seen.append(signals)
            return original(signals, budget)

    with prune(half, Spy(), budget=5):
        out = _forward(half, inputs)
        gen = half.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3
    assert all(s.visual.dtype == torch.float32 for s in seen)
    assert all(s.attention is None or s.attention.dtype == torch.float32 for s in seen)


# ---------------------------------------------------------------------------------------------------------
# Vision side: CLS attention
# ---------------------------------------------------------------------------------------------------------


def test_cls_attention_matches_clip_eager_attention(eager_model, inputs):
    pipeline = TopSignal("cls_attention", _Placement("vision"))
    with prune(eager_model, pipeline, budget=4):
        _forward(eager_model, inputs)
    signals = pipeline.seen[-1]
    with torch.no_grad():
        vision = eager_model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    layer = len(vision.attentions) - 2  # vision_feature_layer = -2
    want = vision.attentions[layer][:, :, 0, 1:]  # CLS row, patch columns
    torch.testing.assert_close(signals.cls_attention, want, atol=1e-6, rtol=0)
    assert signals.grid == (4, 4)
    assert signals.visual.shape == (3, 16, eager_model.config.vision_config.hidden_size)


def test_cls_attention_is_available_before_the_llm(model, inputs):
    pipeline = TopSignal("cls_attention", _Placement("pre_llm"))
    with prune(model, pipeline, budget=4) as handle:
        _forward(model, inputs)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert pipeline.seen[-1].cls_attention.shape == (3, 4, 16)
    assert handle.last_selection.counts.tolist() == [4, 4, 4]


# ---------------------------------------------------------------------------------------------------------
# Handle life cycle, errors
# ---------------------------------------------------------------------------------------------------------


def test_remove_restores_bit_identical_model(model, inputs):
    _forward(model, inputs)  # let transformers install its own lazy output-capture hooks first
    hooks = record_hooks(model)
    state = copy.deepcopy(model.state_dict())
    base = _forward(model, inputs)
    base_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    for placement in PLACEMENTS:
        handle = prune(model, RECIPES[placement], budget=3, positions="compact")
        assert record_hooks(model) != hooks
        pruned = _forward(model, inputs)
        assert pruned.shape[1] < base.shape[1]
        handle.remove()
        handle.remove()  # idempotent
        assert record_hooks(model) == hooks
        assert handle.last_selection is not None
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert torch.equal(_forward(model, inputs), base)
    assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), base_gen)
    assert not any("vtprune" in type(v).__module__ for v in vars(model).values())


def test_unsupported_model_lists_supported_classes():
    from transformers import LlamaForCausalLM

    from adapter_fixtures import tiny_llama_config

    llm = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1))
    with pytest.raises(RegistrationError) as error:
        prune(llm, RECIPES["pre_llm"])
    assert "LlamaForCausalLM" in str(error.value)
    assert "LlavaForConditionalGeneration" in str(error.value)
    assert "LlavaNextForConditionalGeneration" in str(error.value)


def test_bad_layer_positions_and_missing_cls_are_rejected_without_leftovers(model):
    before = record_hooks(model)
    with pytest.raises(ValueError, match="valid k"):
        prune(model, "attention+critical+fps+layer(k=9)")
    with pytest.raises(ValueError, match="positions"):
        prune(model, RECIPES["pre_llm"], positions="shifted")
    embeddings = model.model.vision_tower.embeddings
    saved = embeddings.class_embedding
    try:
        del embeddings.class_embedding  # a tower without CLS token (e.g. SigLIP)
        with pytest.raises(ValueError, match="no CLS token"):
            prune(model, TopSignal("cls_attention", _Placement("pre_llm")), budget=4)
    finally:
        embeddings.class_embedding = saved
    assert record_hooks(model) == before


def test_text_only_forward_is_untouched(model):
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    base = _forward(model, {"input_ids": ids})
    with prune(model, RECIPES["layer"], budget=2) as handle:
        out = _forward(model, {"input_ids": ids})
    assert torch.equal(out, base)
    assert handle.last_selection is None


def test_use_cache_false_and_no_mask(model, inputs):
    feed = {"input_ids": inputs["input_ids"][1:], "pixel_values": inputs["pixel_values"][1:]}
    with prune(model, RECIPES["layer"], budget=4) as handle:
        out = _forward(model, feed, use_cache=False)
    result = handle.last_selection
    removed = removed_by_layer(result, 1, feed["input_ids"].shape[1], 4)
    with masked_reference(model, removed):
        reference = _forward(model, feed, use_cache=False)
    got, want = aligned(out, result, reference, torch.ones_like(feed["input_ids"]))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_third_party_adapter_registers_through_the_hook(model):
    """vtprune_register_adapters: a plugin adds an adapter; adapter lookup then finds it."""
    import pluggy

    from vtprune.adapters.llava import LlavaAdapter

    hookimpl = pluggy.HookimplMarker("vtprune")

    class MyLlava(LlavaAdapter):
        name = "my_llava"
        model_classes = ("MyLlavaForConditionalGeneration",)

    class Plugin:
        @hookimpl
        def vtprune_register_adapters(self, registry):
            registry.add_adapter(MyLlava)

    registry = framework.build_registry(autoload=False, plugins=[Plugin()])
    assert "my_llava" in registry.adapters and "llava" in registry.adapters
    subclass = type("MyLlavaForConditionalGeneration", (type(model),), {})
    fake = subclass.__new__(subclass)  # lookup only needs the class
    from vtprune.framework.prune import adapter_for

    assert adapter_for(fake, registry) is MyLlava
    assert adapter_for(model, registry) is LlavaAdapter
