"""Gemma 3 adapter (pooled SigLIP tokens, bidirectional image blocks, sliding / full layers, several images or
pan-and-scan crops per prompt) against independent references, on a tiny random ``Gemma3ForConditionalGeneration``."""

from __future__ import annotations

import pytest
import torch

from adapter_fixtures import (
    PLACEMENT_RECIPES,
    SignalRecorder,
    aligned,
    check_batch_equals_samples_alone,
    generation_positions,
    kept_only_inputs,
    left_pad,
    masked_reference,
    removed_by_layer,
    sample_alone,
    single_thread,
)
from adapter_fixtures import forward_logits as _forward
from family_checks import check_keep_all_is_bit_identical, check_sdpa_equals_eager
from vtprune.adapters.gemma3 import Gemma3Adapter
from vtprune.framework import VtpruneError
from vtprune.framework.compose import compose
from vtprune.framework.prune import prune
from vtprune.testing import check_adapter

ATOL = 1e-5
VOCAB, IMAGE, BOI, EOI, PAD, BOS = 96, 95, 93, 94, 0, 1
TOKENS = 16  # 8 x 8 SigLIP patches pooled 2 x 2 -> a 4 x 4 grid per image
#: images per sample (sample 1: an image and one pan-and-scan crop of it, i.e. two image blocks)
IMAGES = (1, 2)
PLACEMENTS = ["pre_llm", "layer", "schedule"]

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def tiny_gemma3(attn: str = "sdpa", seed: int = 0, sliding_window: int = 4096):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=7)
    text = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=256, pad_token_id=PAD,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        sliding_window=sliding_window,
    )
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS,
        image_token_index=IMAGE, boi_token_index=BOI, eoi_token_index=EOI,
    )
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = attn
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # the projector weight starts at zero: give the images a signal
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    model.generation_config.pad_token_id = PAD
    return model


def gemma3_inputs(model, samples, images=IMAGES, seed: int = 0) -> dict:
    """Left-padded batch: per sample text, ``[BOI] IMG*16 [EOI]`` per image, a question; ``token_type_ids`` 1 at images."""
    rows, pictures = [], []
    for s in samples:  # one generator per sample: a sample alone is the same sample
        gen = torch.Generator().manual_seed(1000 * seed + s)
        ids = [BOS] + torch.randint(3, 90, (2 + s,), generator=gen).tolist()
        for _ in range(images[s]):
            ids += [BOI] + [IMAGE] * TOKENS + [EOI] + torch.randint(3, 90, (1,), generator=gen).tolist()
            pictures.append(torch.randn(3, 56, 56, generator=gen))
        rows.append(ids + torch.randint(3, 90, (4 + 2 * s,), generator=gen).tolist())
    input_ids, mask = left_pad(rows, PAD)
    return {
        "input_ids": input_ids, "attention_mask": mask, "token_type_ids": (input_ids == IMAGE).long(),
        "pixel_values": torch.stack(pictures),
    }


class gemma_masked_reference(masked_reference):
    """`masked_reference` with each layer type's own rotary embedding for ``compact`` renumbering."""

    def __init__(self, model, removed, positions="keep"):
        super().__init__(model, removed, positions)
        stack, reference = self.stack, self

        class _Stack:  # what the parent's hooks read: layers, config, a two-argument rotary_emb
            layers, config = stack.layers, stack.config

            @staticmethod
            def rotary_emb(hidden, positions):
                return stack.rotary_emb(hidden, positions, reference.kind)

        self.stack, self.kind = _Stack, None

    def _hook(self, number, rem, eager):
        inner, kind = super()._hook(number, rem, eager), self.stack.config.layer_types[number]

        def hook(module, args, kwargs):
            self.kind = kind
            return inner(module, args, kwargs)

        return hook


def check_forward_and_generate(model, inputs, recipe, positions, kept_only, budget=6):
    """Pruned forward + 8 greedy tokens == the unpruned model with the dropped tokens masked out (``kept_only``:
    == the model fed only the kept tokens, their ``token_type_ids`` kept so the image blocks stay bidirectional)."""
    feed = {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}
    with prune(model, recipe, budget=budget, positions=positions) as handle:
        out = _forward(model, feed)
        result = handle.last_selection
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    batch, length = inputs["input_ids"].shape
    removed = removed_by_layer(result, batch, length, model.config.text_config.num_hidden_layers)
    if kept_only:
        reference_inputs = kept_only_inputs(model, inputs, removed[0])
        real = inputs["attention_mask"].bool() & ~removed[0]
        types = [inputs["token_type_ids"][b, real[b]] for b in range(batch)]
        reference_inputs["token_type_ids"] = left_pad([t.tolist() for t in types], 0)[0]
        reference = _forward(model, reference_inputs)
        slots = result.sequence_mask & inputs["attention_mask"].bool().gather(1, result.sequence_index)
        torch.testing.assert_close(out[slots], reference[reference_inputs["attention_mask"].bool()], atol=ATOL, rtol=0)
        # Gemma 3's generate takes no inputs_embeds: greedy tokens against the masked, renumbered reference
        with gemma_masked_reference(model, removed, positions):
            ref_gen = model.generate(**feed, max_new_tokens=8, do_sample=False)
        assert torch.equal(generated[:, length:], ref_gen[:, length:])
    if not kept_only or positions == "compact":
        with gemma_masked_reference(model, removed, positions):
            reference = _forward(model, feed)
            ref_gen = model.generate(**feed, max_new_tokens=8, do_sample=False)
        got, want = aligned(out, result, reference, inputs["attention_mask"])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        assert torch.equal(generated[:, length:], ref_gen[:, length:])
    return result


def _alone(inputs, b):
    out = sample_alone(inputs, b, sum(IMAGES[:b]), IMAGES[b])
    out["token_type_ids"] = inputs["token_type_ids"][b : b + 1, inputs["attention_mask"][b].bool()]
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_gemma3()


@pytest.fixture(scope="module")
def inputs(model):
    return gemma3_inputs(model, [0, 1])


def test_rows_are_image_blocks_with_grids_and_markers_stay(model, inputs):
    recorder = SignalRecorder(compose(PLACEMENT_RECIPES["pre_llm"]))
    with prune(model, recorder, budget=5) as handle:
        _forward(model, inputs)
    result = handle.last_selection
    assert result.num_tokens.tolist() == [TOKENS] * 3 and result.image_sample.tolist() == [0, 1, 1]
    assert recorder.seen[0].grid == (4, 4)
    ids = inputs["input_ids"]
    kept = ids.gather(1, result.sequence_index)[result.sequence_mask]
    for marker in (BOI, EOI):
        assert int((kept == marker).sum()) == int((ids == marker).sum())
    assert int((kept == IMAGE).sum()) == 15


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_keep_all_is_bit_identical_and_remove_restores_hooks(model, inputs, placement):
    check_keep_all_is_bit_identical(
        model, inputs, PLACEMENT_RECIPES[placement], _forward, all_counted=True, unpruned_after=True
    )


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_pruned_forward_and_generate_match_reference(model, inputs, placement, positions):
    kept_only = positions == "compact" and placement == "pre_llm"
    result = check_forward_and_generate(model, inputs, PLACEMENT_RECIPES[placement], positions, kept_only)
    assert bool((result.counts < result.num_tokens).all())


def test_kept_image_tokens_keep_the_bidirectional_block():
    """The reference really is bidirectional: without the block rule the pruned logits would differ."""
    model = tiny_gemma3()
    batch = gemma3_inputs(model, [0, 1])
    causal = {k: v for k, v in batch.items() if k != "token_type_ids"}
    assert not torch.allclose(_forward(model, batch), _forward(model, causal), atol=1e-3)
    check_forward_and_generate(model, causal, PLACEMENT_RECIPES["layer"], "keep", False)  # no types: plain causal


def test_sliding_window_counts_original_positions():
    model = tiny_gemma3(sliding_window=12)
    batch = gemma3_inputs(model, [0, 1])
    feed = {**batch, "position_ids": generation_positions(batch["attention_mask"])}
    for placement in ("pre_llm", "layer"):
        with prune(model, PLACEMENT_RECIPES[placement], budget=5) as handle:
            out = _forward(model, feed)
        result = handle.last_selection
        removed = removed_by_layer(result, *batch["input_ids"].shape, 4)
        with gemma_masked_reference(model, removed, "keep"):
            reference = _forward(model, feed)
        got, want = aligned(out, result, reference, batch["attention_mask"])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("placement", ["pre_llm", "layer"])
def test_batch_equals_samples_alone(model, inputs, placement, positions):
    alone = [(_alone(inputs, 0), [3]), (_alone(inputs, 1), [5, 2])]
    check_batch_equals_samples_alone(model, inputs, PLACEMENT_RECIPES[placement], positions, [3, 5, 2], alone, atol=ATOL)


def test_sdpa_equals_eager_and_vision_is_refused():
    sdpa, eager = tiny_gemma3("sdpa"), tiny_gemma3("eager")
    batch = gemma3_inputs(sdpa, [0, 1])
    for placement in PLACEMENTS:
        check_sdpa_equals_eager(sdpa, eager, batch, PLACEMENT_RECIPES[placement], 5, 1e-5, _forward)
    with pytest.raises(VtpruneError, match="pool"):
        prune(sdpa, PLACEMENT_RECIPES["vision"], budget=5)


def test_adapter_check_and_registration(model):
    from vtprune.framework.registry import default_registry

    assert default_registry().adapter_for(model) is Gemma3Adapter
    check_adapter(lambda: model, gemma3_inputs, samples=(0, 1))
    check_adapter(
        lambda: model, gemma3_inputs, PLACEMENT_RECIPES["schedule"], samples=(0, 1),
        keep_all_recipe=PLACEMENT_RECIPES["schedule"].replace("ratio=0.5", "ratio=1.0"),
    )


#: sliding windows shorter than prompt + generation: 6 holds only text while decoding (the question is longer);
#: 12 reaches back into the (partly dropped) image block of each row for the first decoding steps
WINDOWS = (6, 12)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("placement", ["pre_llm", "layer", "schedule"])
def test_generation_beyond_the_sliding_window_matches_the_masked_reference(placement, window):
    """Issue 13 leftover: a sliding window far shorter than prompt + generation (two image blocks of 16 tokens,
    then 8 greedy tokens): the pruned forward and generate equal the unpruned model with the dropped tokens masked
    out, the window counted in original positions while decoding too, for every layer type of every segment."""
    model = tiny_gemma3(sliding_window=window)
    batch = gemma3_inputs(model, [0, 1])
    assert batch["input_ids"].shape[1] + 8 > 4 * window
    check_forward_and_generate(model, batch, PLACEMENT_RECIPES[placement], "keep", False, budget=5)


@pytest.mark.parametrize("placement", ["pre_llm", "layer"])
def test_generation_beyond_the_sliding_window_compact(placement):
    """As above with ``positions="compact"`` (window 12): renumbered rotary positions, the window still counted in
    original positions (the masked reference renumbers the unpruned model's rotary positions only)."""
    model = tiny_gemma3(sliding_window=WINDOWS[-1])
    batch = gemma3_inputs(model, [0, 1])
    check_forward_and_generate(model, batch, PLACEMENT_RECIPES[placement], "compact", False, budget=5)
