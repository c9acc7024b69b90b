"""Qwen2-VL / Qwen2.5-VL adapter against independent references (tiny random models, CPU, fp32).

References are written without the adapter: the unpruned model with the dropped visual tokens masked
out of attention (same M-RoPE position ids) for ``positions="keep"``, and the model fed only the kept
tokens as embeddings for ``"compact"``. Tolerance: 1e-5 absolute on logits (fp32).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from vtprune.framework import compose, prune
from vtprune.adapters.qwen2_vl import QwenVLAdapter, find_visual_segments

from adapter_fixtures import NeedsCls, record_hooks, single_thread
from qwen_fixtures import (
    CHANNELS, END, IMAGE, MERGE, MIXED, PAD, PATCH, PRE_LLM, SCHEDULE, TEMPORAL, TOKEN_IDS, TOL, TURN, VIDEO,
    VISION, VISION_END, VISION_START, WITH_VIDEO, MaskedReference, Recording, Sample, aligned, batch, build,
    check_batch_equals_each_sample_alone, check_compact_positions, check_generate, check_generate_compact,
    check_keep_positions, check_manual_decoding, check_merge_units, check_own_values_go_through_the_merger,
    check_schedule_keep, check_sdpa_equals_eager, kept_mask, logits, text_config, tiny_qwen,
)

KINDS = ("qwen2_vl", "qwen2_5_vl")
LAYER = "attention+critical+diversity.none+split+layer(k=2)"

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


# ------------------------------------------------------------------------------------------------
# Tiny models
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_keep_all_is_bit_identical_and_removal_restores_hooks(kind):
    model = tiny_qwen(kind)
    inputs, _ = batch(MIXED)
    before, hooks = logits(model, inputs), record_hooks(model)
    handle = prune(model, PRE_LLM, budget=1.0)
    assert handle.adapter is QwenVLAdapter
    assert torch.equal(logits(model, inputs), before)
    handle.remove()
    assert record_hooks(model) == hooks
    assert torch.equal(logits(model, inputs), before)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("recipe,from_layer", [(PRE_LLM, 0), (LAYER, 2)])
def test_keep_positions_match_masked_reference(kind, recipe, from_layer):
    inputs, layouts = batch(MIXED)
    check_keep_positions(tiny_qwen(kind), inputs, layouts, recipe, from_layer, [3, 3, 2])


@pytest.mark.parametrize("kind", KINDS)
def test_schedule_keep_matches_masked_reference(kind):
    inputs, layouts = batch(MIXED)
    check_schedule_keep(tiny_qwen(kind), inputs, layouts, {1: [4, 4, 2], 2: [2, 2, 1]})


def merged_embeddings(model, inputs: dict) -> torch.Tensor:
    """(B, L, D) decoder input of the unpruned model: token embeddings with the tower outputs written at
    the placeholders (what ``Qwen2VLModel.forward`` builds)."""
    ids = inputs["input_ids"]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids).clone()
        kinds = ((IMAGE, "pixel_values", "image_grid_thw"), (VIDEO, "pixel_values_videos", "video_grid_thw"))
        for token, pixels, grid in kinds:
            if pixels in inputs:
                get = model.model.get_image_features if token == IMAGE else model.model.get_video_features
                features = torch.cat(get(inputs[pixels], inputs[grid]).pooler_output)
                embeds[ids == token] = features
    return embeds


def compact_reference(model, inputs: dict, keep: torch.Tensor, steps: int = 0):
    """The model fed only the kept tokens of one unpadded sample as embeddings: logits, or greedy tokens."""
    assert keep.shape[0] == 1 and bool(inputs["attention_mask"].all())
    kept = merged_embeddings(model, inputs)[keep].unsqueeze(0)  # (1, K, D)
    model.model.rope_deltas = None  # forget the last prefill: plain 1-D positions 0..K-1
    with torch.no_grad():
        if steps:
            mask = torch.ones(kept.shape[:2], dtype=torch.long)
            out = model.generate(
                inputs_embeds=kept, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                return_dict_in_generate=True, output_logits=True,
            )
            return torch.stack(out.logits, 1)
        return model(inputs_embeds=kept, use_cache=False).logits


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("recipe", [PRE_LLM, LAYER])
def test_compact_positions(kind, recipe):
    """pre_llm: equals the model fed only the kept tokens; layer(k): the layers >= k see the kept tokens at
    positions 0..K-1 (checked through the reference with per-layer rotary embeddings)."""
    inputs, layouts = batch([Sample(images=((3, 3),), question=(20, 21, 22, 23))])
    check_compact_positions(tiny_qwen(kind), inputs, layouts, recipe, 2, compact_reference)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "recipe,from_layer,positions",
    [(PRE_LLM, 0, "keep"), (LAYER, 2, "keep"), (PRE_LLM, 0, "compact"), (LAYER, 2, "compact"), (VISION, 0, "keep")],
)
def test_generate_matches_reference_and_cache_holds_kept_tokens(kind, recipe, from_layer, positions):
    inputs, layouts = batch(MIXED)
    check_generate(tiny_qwen(kind), inputs, layouts, recipe, from_layer, positions)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_compact_matches_kept_tokens_only(kind):
    inputs, layouts = batch([Sample(images=((3, 3),), question=(20, 21, 22, 23))])
    check_generate_compact(tiny_qwen(kind), inputs, layouts, compact_reference)


@pytest.mark.parametrize(
    "kind,recipe,positions",
    [("qwen2_vl", PRE_LLM, "keep"), ("qwen2_5_vl", LAYER, "keep"), ("qwen2_vl", SCHEDULE, "compact"),
     ("qwen2_5_vl", VISION, "keep")],
)
def test_left_padded_batch_equals_each_sample_alone(kind, recipe, positions):
    """Images of different sizes and counts, a video, left padding: each row as if alone (last-token
    logits and 4 greedy tokens)."""
    check_batch_equals_each_sample_alone(tiny_qwen(kind), WITH_VIDEO, recipe, positions)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("recipe", [LAYER, SCHEDULE, PRE_LLM, VISION])
def test_sdpa_equals_eager(kind, recipe):
    """Same selection (in-LLM attention rows are recomputed under sdpa) and the same logits at every
    real token (padding and filler rows attend to nothing and are left out), for every placement."""
    inputs, layouts = batch(MIXED)
    check_sdpa_equals_eager(partial(tiny_qwen, kind), inputs, layouts, recipe)


@pytest.mark.parametrize("kind", KINDS)
def test_video_budget_is_per_video(kind):
    model = tiny_qwen(kind)
    samples = [
        Sample(images=((2, 2),), videos=((2, 2, 3),), question=(20, 21), seed=3),
        Sample(images=(), videos=((3, 1, 2),), question=(22, 23, 24), seed=4),
    ]
    inputs, layouts = batch(samples)
    with prune(model, LAYER, budget=0.5) as handle:
        pruned = logits(model, inputs)
        result = handle.last_selection
    assert result.num_tokens.tolist() == [4, 12, 6]
    assert result.counts.tolist() == [2, 6, 3]
    with prune(model, LAYER, budget=[1, 5, 6]) as handle:  # one budget per image / video, in order
        logits(model, inputs)
        assert handle.last_selection.counts.tolist() == [1, 5, 6]
    keep = kept_mask(result, inputs, layouts)
    reference = MaskedReference(model, inputs, keep, 2).logits()
    ours, theirs = aligned(pruned, reference, keep)
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)


def test_signals_rows_prompt_span_and_grid():
    model = tiny_qwen()
    recording = Recording(compose(PRE_LLM))
    inputs, _ = batch(MIXED)
    with prune(model, recording, budget=3):
        logits(model, inputs)
    signals = recording.signals[-1]
    assert signals.visual.shape == (3, 9, 32)
    assert signals.valid().sum(1).tolist() == [6, 9, 2]
    assert signals.grid is None  # different grids: one per row instead
    assert signals.grids.tolist() == [[2, 3], [3, 3], [1, 2]]
    embed = model.get_input_embeddings().weight
    questions = [MIXED[0].question, MIXED[1].question, MIXED[1].question]
    for row, question in enumerate(questions):
        assert signals.prompt_mask[row].sum() == len(question)
        torch.testing.assert_close(signals.prompt[row, : len(question)], embed[list(question)], atol=0, rtol=0)
    # prompt_stop ends the turn at its first occurrence after the images, else at the end of the input:
    # sample 0 keeps (20,), sample 1 (no 21) keeps its question and the generation prompt "<|im_start|> w8"
    stopped = Recording(compose(PRE_LLM))
    with prune(model, stopped, budget=3, prompt_stop=[21]):
        logits(model, inputs)
    assert stopped.signals[-1].prompt_mask.sum(1).tolist() == [1, 4, 4]
    uniform = Recording(compose(PRE_LLM))
    inputs, _ = batch([Sample(images=((2, 3),)), Sample(images=((2, 3),), seed=5)])
    with prune(model, uniform, budget=3):
        logits(model, inputs)
    assert uniform.signals[-1].grid == (2, 3)


@pytest.mark.parametrize("positions", ["keep", "compact"])
def test_manual_decoding_without_position_ids_follows_rope_deltas(positions):
    """A hand-written decode loop (no position ids; with or without the unpruned-layout mask) gives the
    tokens ``generate`` gives."""
    inputs, _ = batch([Sample(images=((3, 3),), question=(20, 21, 22))])
    check_manual_decoding(tiny_qwen("qwen2_5_vl"), inputs, LAYER, positions, steps=6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("recipe", [LAYER, PRE_LLM, VISION])
def test_half_precision_models_run(dtype, recipe):
    model = tiny_qwen("qwen2_5_vl").to(dtype)
    inputs, _ = batch(MIXED)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with prune(model, recipe, budget=3) as handle:
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert handle.last_selection.counts.tolist() == [3, 3, 2]
    assert out.shape == (2, inputs["input_ids"].shape[1] + 2)


def test_text_only_forward_is_untouched():
    model = tiny_qwen()
    ids = torch.tensor([[TURN, 5, 6, END, TURN, 20, 21, 22]])
    before = logits(model, {"input_ids": ids})
    with prune(model, LAYER, budget=3):
        assert torch.equal(logits(model, {"input_ids": ids}), before)


def test_unavailable_signals_and_placements_fail_at_attach():
    from vtprune.framework import MissingSignalError, VtpruneError

    model = tiny_qwen()

    needs_cls = NeedsCls(compose(PRE_LLM).placement)
    with pytest.raises(MissingSignalError, match="cls_attention"):
        prune(model, needs_cls, budget=3)
    with pytest.raises(MissingSignalError, match="no CLS token.*pre_llm|pre_llm.*no CLS token"):
        QwenVLAdapter.runtime(QwenVLAdapter(model), needs_cls, 3)
    with pytest.raises(MissingSignalError, match="cls_attention.*placement 'vision'"):
        prune(model, "visionzip", budget=3)  # CLS attention at the vision placement
    with pytest.raises(MissingSignalError, match="Qwen2VLForConditionalGeneration.*cls_attention.*vision.*no CLS"):
        QwenVLAdapter.runtime(QwenVLAdapter(model), compose("visionzip"), 3)
    with pytest.raises(VtpruneError, match="does not implement placement 'pre_llm_clip'"):
        prune(model, "cdpruner", budget=3, clip_model=object())
    with pytest.raises(ValueError, match="input_ids"):
        with prune(model, PRE_LLM, budget=3):
            inputs, _ = batch(MIXED)
            embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
            model(inputs_embeds=embeds, **inputs)


def tiny_qwen_tokenizer():
    """WordLevel ``PreTrainedTokenizerFast`` whose special tokens carry the tiny configs' ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = {
        "<pad>": PAD, "<|im_end|>": END, "<|im_start|>": TURN, "<|vision_start|>": VISION_START,
        "<|vision_end|>": VISION_END, "<|image_pad|>": IMAGE, "<|video_pad|>": VIDEO,
    }
    vocab = dict(special)
    vocab.update({f"w{i}": i for i in range(3, VISION_START)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<pad>", eos_token="<|im_end|>", padding_side="left"
    )
    extra = [token for token in special if token not in ("<pad>", "<|im_end|>")]
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    return tokenizer


def tiny_image_processor():
    """The PIL (torchvision-free) Qwen2-VL image processor at the tiny tower's patch / merge sizes."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=PATCH, temporal_patch_size=TEMPORAL, merge_size=MERGE, min_pixels=16, max_pixels=256
    )


def process(tokenizer, image_processor, images, texts) -> dict:
    """``Qwen2VLProcessor(images=..., text=...)``. transformers 5.x cannot build that processor without
    torchvision (its constructor checks for ``VideoProcessorMixin``, exported only with torchvision); then
    the same steps run on its two parts: the image processor, each ``<|image_pad|>`` expanded to
    ``grid.prod() / merge**2`` placeholders (``Qwen2VLProcessor.replace_image_token``), the tokenizer, and
    ``mm_token_type_ids`` (1 at image placeholders)."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():  # pragma: no cover - torchvision is not installed in CI
        from transformers import Qwen2VLProcessor

        processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)
        return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))
    visual = dict(image_processor(images=images, return_tensors="pt"))
    counts = iter((visual["image_grid_thw"].prod(-1) // image_processor.merge_size**2).tolist())
    expanded = []
    for text in texts:
        pieces = text.split("<|image_pad|>")
        expanded.append(pieces[0] + "".join(" <|image_pad|>" * next(counts) + " " + p for p in pieces[1:]))
    encoded = dict(tokenizer(expanded, return_tensors="pt", padding=True))
    encoded["mm_token_type_ids"] = (encoded["input_ids"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")).int()
    return {**encoded, **visual}


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_roundtrip_with_processor_inputs(kind, tmp_path):
    import numpy as np
    from PIL import Image
    from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model, tokenizer, image_processor = tiny_qwen(kind), tiny_qwen_tokenizer(), tiny_image_processor()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "processor")
    image_processor.save_pretrained(tmp_path / "processor")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "model").eval()
    assert type(loaded) is type(model)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "processor")
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(tmp_path / "processor")

    rng = np.random.default_rng(0)
    sizes = ((12, 8, 3), (8, 16, 3), (8, 8, 3))
    images = [Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)) for size in sizes]
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    chat = "<|im_start|> w5 w6 <|im_end|> <|im_start|> w7 {images} {question} <|im_end|> <|im_start|> w8"
    texts = [
        chat.format(images=image, question="w20 w21 w22"),
        chat.format(images=f"{image} w30 {image}", question="w23"),
    ]
    inputs = process(tokenizer, image_processor, images, texts)
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 4], [1, 4, 8], [1, 4, 4]]

    starts = [(b, s) for b, row in enumerate(inputs["input_ids"].tolist()) for s in range(len(row))
              if row[s] == IMAGE and row[s - 1] != IMAGE]
    with prune(loaded, LAYER, budget=0.5) as handle:
        pruned = logits(loaded, inputs)
        generated = loaded.generate(**inputs, max_new_tokens=8, do_sample=False)
        result = handle.last_selection
    assert result.num_tokens.tolist() == [6, 8, 4] and result.counts.tolist() == [3, 4, 2]
    assert [(int(b), int(p[0])) for b, p in zip(result.image_sample, result.image_positions)] == starts
    keep = inputs["attention_mask"].bool().clone()
    for r in range(3):
        keep[int(result.image_sample[r]), result.image_positions[r]] = False
        keep[int(result.image_sample[r]), result.kept_positions(r)] = True
    reference = MaskedReference(loaded, inputs, keep, 2).logits()
    ours, theirs = aligned(pruned, reference, keep)
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)
    with prune(model, LAYER, budget=0.5):  # the original instance, pruned the same way
        assert torch.equal(model.generate(**inputs, max_new_tokens=8, do_sample=False), generated)


def test_module_docstring_examples_run():
    import doctest

    import vtprune.adapters.qwen2_vl as module

    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0


# ------------------------------------------------------------------------------------------------
# The vision placement (before the patch merger)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_vision_placement_keep_all_masked_reference_and_signals(kind):
    """Keep-all is bit-identical; a pruned forward equals the masked reference; every row of
    ``Signals.visual`` is the merge unit of its LLM token: the merger maps it to exactly the token the
    model's own ``get_image_features`` / ``get_video_features`` give (Qwen2.5-VL: after undoing the
    window order, which is not the identity for these grids)."""
    model = tiny_qwen(kind)
    inputs, layouts = batch(WITH_VIDEO)
    before = logits(model, inputs)
    with prune(model, VISION, budget=1.0):
        assert torch.equal(logits(model, inputs), before)
    recording = Recording(compose(VISION))
    check_keep_positions(model, inputs, layouts, recording, 0, [3, 3, 2, 3, 3])
    # rows in sequence order: sample 0 image, sample 1 two images, sample 2 image then video
    check_merge_units(model, inputs, recording.signals[-1], model.model.visual.merger.ln_q.weight.shape[0])
    if kind == "qwen2_5_vl":
        order = QwenVLAdapter(model).window_order(inputs["image_grid_thw"])
        assert not torch.equal(order, torch.arange(order.numel()))


@pytest.mark.parametrize("kind", KINDS)
def test_vision_merged_values_go_through_the_merger(kind):
    inputs, _ = batch(MIXED)
    check_own_values_go_through_the_merger(tiny_qwen(kind), inputs)


@pytest.mark.parametrize("recipe", ["none+critical+grid+pre_llm", "pooling", "none+critical+grid+vision"])
def test_grid_stages_see_each_images_own_grid_in_a_mixed_batch(recipe):
    """Images of different sizes: stages that use the patch grid get each row's own grid
    (`Signals.grids`), so a row selects the same tokens in the batch as alone (where it gets `grid`)."""
    model = tiny_qwen("qwen2_5_vl")
    samples = [Sample(images=((3, 4),), seed=0), Sample(images=((4, 3), (2, 5)), question=(23, 24), seed=1)]
    inputs, _ = batch(samples)
    with prune(model, recipe, budget=4) as handle:
        together = logits(model, inputs)[:, -1]
        rows = [handle.last_selection.selection.row_indices(r).tolist() for r in range(3)]
        alone_rows = []
        for b, sample in enumerate(samples):
            alone, _ = batch([sample])
            torch.testing.assert_close(logits(model, alone)[:, -1], together[b : b + 1], atol=TOL, rtol=0)
            result = handle.last_selection
            alone_rows += [result.selection.row_indices(r).tolist() for r in range(len(sample.images))]
    assert rows == alone_rows
    # a 2-D lattice, not a 1-D spread: on the 3 x 4 image the 4 tokens cover more than one grid row
    assert len({index // 4 for index in rows[0]}) > 1


def test_prune_errors_say_why_a_placement_or_signal_is_missing():
    from vtprune.framework import MissingSignalError, VtpruneError

    model = tiny_qwen()
    with pytest.raises(MissingSignalError, match="cls_attention: the Qwen vision tower has no CLS token"):
        prune(model, "visionzip", budget=3)
    with pytest.raises(VtpruneError, match="pre_llm_clip' \\(Qwen's tower is not a CLIP model"):
        prune(model, "cdpruner", budget=3, clip_model=object())


@pytest.mark.parametrize("kind", KINDS)
def test_video_rows_carry_their_frames(kind):
    """frames = (grid_t, h / m, w / m) of each video (the processor's grid), frame t's tokens = the model's own
    get_video_features rows of frame t; image rows (0, 0, 0); batch == alone."""
    from frame_checks import FRAME_RECIPES, check_frames, check_frames_batch_equals_alone, grid_rows

    model = tiny_qwen(kind)
    samples = WITH_VIDEO + [Sample(images=(), videos=((3, 1, 2), (2, 2, 1)), question=(26, 27), seed=3)]
    inputs, layouts = batch(samples)
    check_frames(model, inputs, grid_rows(model, inputs, layouts), logits, {**FRAME_RECIPES, "vision": VISION})
    check_frames_batch_equals_alone(model, inputs, [batch([s])[0] for s in samples], logits)
