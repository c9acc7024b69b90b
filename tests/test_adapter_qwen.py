"""Qwen2-VL / Qwen2.5-VL adapter against independent references (tiny random models, CPU, fp32).

References are written without the adapter: the unpruned model with the dropped visual tokens masked
out of attention (same M-RoPE position ids) for ``positions="keep"``, and the model fed only the kept
tokens as embeddings for ``"compact"``. Tolerance: 1e-5 absolute on logits (fp32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import pytest
import torch

from vtprune.framework import compose, prune
from vtprune.adapters.qwen2_vl import QwenVLAdapter, find_visual_segments

from adapter_fixtures import left_pad, record_hooks

TOL = 1e-5
VOCAB = 64
PAD, END, TURN = 0, 1, 2  # <pad>, <|im_end|> (the text config's EOS), <|im_start|>
VISION_START, VISION_END, IMAGE, VIDEO = 60, 61, 62, 63
MERGE, PATCH, TEMPORAL, CHANNELS = 2, 2, 2, 3
KINDS = ("qwen2_vl", "qwen2_5_vl")

PRE_LLM = "prompt_cosine+critical+fps+split(critical=0.6)+pre_llm"
LAYER = "attention+critical+diversity.none+split+layer(k=2)"
SCHEDULE = "attention+critical+diversity.none+split+schedule(layers=[1,2],ratio=0.5)"
VISION = "none+critical+fps+vision"


# ------------------------------------------------------------------------------------------------
# Tiny models and inputs
# ------------------------------------------------------------------------------------------------


def tiny_qwen(kind: str = "qwen2_vl", attn: str = "sdpa", seed: int = 0, layers: int = 3):
    """A random Qwen2-VL or Qwen2.5-VL: 4 heads (GQA 4/2) of 8 dims, M-RoPE sections (2, 1, 1)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    text = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
        max_position_embeddings=512,
        eos_token_id=END,
        pad_token_id=PAD,
        bos_token_id=None,
    )
    common = dict(patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, in_channels=CHANNELS)
    ids = dict(
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END
    )
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, **common)
        config, cls = Qwen2VLConfig(text_config=text, vision_config=vision, **ids), Qwen2VLForConditionalGeneration
    else:
        # windows of 2 x 2 merged tokens (8 px / merge 2 / patch 2): a 3 x 3 grid is windowed unevenly
        vision = dict(
            depth=2, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2, window_size=8,
            fullatt_block_indexes=[1], tokens_per_second=2, **common,
        )
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        cls = Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(config)
    model.set_attn_implementation(attn)
    model.eval()
    model.generation_config.eos_token_id = None  # random tiny models emit EOS early; tests want 8 steps
    model.generation_config.pad_token_id = PAD
    return model


@dataclass(frozen=True)
class Sample:
    """One prompt: images as (h, w) and videos as (t, h, w) in merged LLM tokens, a question."""

    images: tuple = ((2, 3),)
    videos: tuple = ()
    question: tuple = (20, 21, 22)
    seed: int = 0

    def tokens(self) -> tuple[list[int], list[tuple[str, int, tuple[int, int, int]]]]:
        """Chat-template-like ids and the (kind, start, grid) of every visual item."""
        ids = [TURN, 5, 6, END, TURN, 7]  # system turn, then "<|im_start|>user"
        items = []
        for kind, grids in (("image", [(1, *g) for g in self.images]), ("video", list(self.videos))):
            for grid in grids:
                ids.append(VISION_START)
                items.append((kind, len(ids), tuple(grid)))
                ids += [IMAGE if kind == "image" else VIDEO] * (grid[0] * grid[1] * grid[2])
                ids.append(VISION_END)
        ids += list(self.question) + [END, TURN, 8]  # end of turn, "<|im_start|>assistant"
        return ids, items

    def pixels(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        generator = torch.Generator().manual_seed(1000 + self.seed)
        width = CHANNELS * TEMPORAL * PATCH * PATCH
        images = [torch.randn(h * w * MERGE * MERGE, width, generator=generator) for h, w in self.images]
        videos = [torch.randn(t * h * w * MERGE * MERGE, width, generator=generator) for t, h, w in self.videos]
        return images, videos


def batch(samples: Sequence[Sample]) -> tuple[dict, list[list[tuple[str, int, tuple]]]]:
    """Left-padded model inputs and, per sample, its visual items with padded start positions."""
    rows, layouts = [], []
    for sample in samples:
        ids, items = sample.tokens()
        rows.append(ids)
        layouts.append(items)
    ids, mask = left_pad(rows, PAD)
    width = ids.shape[1]
    layouts = [[(k, s + width - len(r), g) for k, s, g in items] for r, items in zip(rows, layouts)]
    inputs = {"input_ids": ids, "attention_mask": mask}
    inputs["mm_token_type_ids"] = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    images = [(p, (1, h * MERGE, w * MERGE)) for s in samples for p, (h, w) in zip(s.pixels()[0], s.images)]
    videos = [(p, (t, h * MERGE, w * MERGE)) for s in samples for p, (t, h, w) in zip(s.pixels()[1], s.videos)]
    if images:
        inputs["pixel_values"] = torch.cat([p for p, _ in images])
        inputs["image_grid_thw"] = torch.tensor([g for _, g in images])
    if videos:
        inputs["pixel_values_videos"] = torch.cat([p for p, _ in videos])
        inputs["video_grid_thw"] = torch.tensor([g for _, g in videos])
    return inputs, layouts


# ------------------------------------------------------------------------------------------------
# Independent references
# ------------------------------------------------------------------------------------------------


def rope_positions(model, inputs: dict) -> torch.Tensor:
    """(3, B, L) M-RoPE ids of the unpruned input, from the model's own ``get_rope_index``."""
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        attention_mask=inputs["attention_mask"],
    )
    return positions


def additive(allowed: torch.Tensor) -> torch.Tensor:
    """(B, Q, K) bool -> (B, 1, Q, K) fp32 additive mask."""
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min).unsqueeze(1)


class MaskedReference:
    """The unpruned model where dropped tokens are invisible as keys to layers >= ``from_layer``.

    Per-layer masks are swapped in with pre-hooks on the reference model's layers (test code only).
    With ``compact=True`` the layers >= ``from_layer`` also get rotary embeddings of the compact ids: the
    kept tokens numbered 0..K-1, then K, K+1, ... for generated tokens.
    """

    def __init__(
        self, model, inputs: dict, keep: torch.Tensor, from_layer: int = 0, later: Sequence = (), compact: bool = False
    ):
        self.model, self.inputs, self.from_layer, self.compact = model, inputs, from_layer, compact
        self.real = inputs["attention_mask"].bool()  # (B, L)
        self.keep = keep & self.real  # (B, L), the tokens left after the last drop
        self.positions = rope_positions(model, inputs)
        # (first layer, keys visible from there on): the drops in model order, then the decoding steps
        self.keys = [(0, self.real)] + [(layer, k & self.real) for layer, k in ((from_layer, keep), *later)]

    def _forward(self, query_len: int, compact_ids: torch.Tensor, **kwargs):
        total = self.keys[0][1].shape[1]
        causal = torch.ones(total, total, dtype=torch.bool).tril()[-query_len:]  # (Q, K)
        masks = [(layer, additive(causal.unsqueeze(0) & keys.unsqueeze(1))) for layer, keys in self.keys]
        stack = self.model.model.language_model
        rotary = stack.rotary_emb(torch.zeros(1), compact_ids.unsqueeze(0).expand(3, -1, -1))
        handles = []
        for number, layer in enumerate(stack.layers):
            override = {"attention_mask": [m for start, m in masks if start <= number][-1]}
            if self.compact and number >= self.from_layer:
                override["position_embeddings"] = rotary
            handles.append(layer.register_forward_pre_hook(
                lambda module, args, kw, override=override: (args, {**kw, **override}), with_kwargs=True
            ))
        try:
            return self.model(attention_mask={"full_attention": masks[0][1]}, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    def logits(self) -> torch.Tensor:
        inputs = {k: v for k, v in self.inputs.items() if k != "attention_mask"}
        compact_ids = (self.keep.long().cumsum(1) - 1).clamp(min=0)  # (B, L)
        with torch.no_grad():
            out = self._forward(self.keep.shape[1], compact_ids, position_ids=self.positions, use_cache=False, **inputs)
        return out.logits

    def generate(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy tokens (B, steps) and their logits (B, steps, V); new tokens continue at the last
        prompt position + 1 (compact ids: at the number of kept tokens)."""
        inputs = {k: v for k, v in self.inputs.items() if k != "attention_mask"}
        following = self.positions.amax(dim=(0, 2)) + 1  # (B,)
        kept = self.keep.sum(1)  # (B,)
        compact_ids = (self.keep.long().cumsum(1) - 1).clamp(min=0)  # (B, L)
        with torch.no_grad():
            out = self._forward(self.keep.shape[1], compact_ids, position_ids=self.positions, use_cache=True, **inputs)
            scores = [out.logits[:, -1]]
            for step in range(1, steps):
                ones = torch.ones(self.keep.shape[0], 1, dtype=torch.bool)
                self.keys = [(layer, torch.cat([keys, ones], 1)) for layer, keys in self.keys]
                position = (following + step - 1).view(1, -1, 1).expand(3, -1, 1)
                token = scores[-1].argmax(-1, keepdim=True)
                out = self._forward(
                    1, (kept + step - 1).unsqueeze(1), input_ids=token, position_ids=position, cache=out.cache
                )
                scores.append(out.logits[:, -1])
        scores = torch.stack(scores, dim=1)
        return scores.argmax(-1), scores


def kept_mask(result, inputs: dict, layouts) -> torch.Tensor:
    """(B, L) bool: real tokens minus the visual tokens the adapter reports dropped; also checks that
    the reported visual spans are the ones the test built."""
    keep = inputs["attention_mask"].bool().clone()
    expected = [(b, start, grid) for b, items in enumerate(layouts) for _, start, grid in items]
    assert len(result.image_positions) == len(expected)
    for r, (b, start, (t, h, w)) in enumerate(expected):
        assert int(result.image_sample[r]) == b
        assert result.image_positions[r].tolist() == list(range(start, start + t * h * w))
        keep[b, result.image_positions[r]] = False
        keep[b, result.kept_positions(r)] = True
    return keep


def aligned(pruned: torch.Tensor, reference: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pruned logits (B, W, V) at the kept real tokens (right-aligned, in order) and the reference's
    logits (B, L, V) at the same tokens, as two (n, V) tensors."""
    ours, theirs = [], []
    for b in range(keep.shape[0]):
        positions = keep[b].nonzero().flatten()
        ours.append(pruned[b, pruned.shape[1] - positions.numel() :])
        theirs.append(reference[b, positions])
    return torch.cat(ours), torch.cat(theirs)


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


class Recording:
    """A pipeline wrapper that records the `Signals` it is given (to check spans and shapes)."""

    def __init__(self, pipeline):
        self.pipeline, self.signals = pipeline, []
        self.placement, self.requires = pipeline.placement, pipeline.requires

    def select(self, signals, budget):
        self.signals.append(signals)
        return self.pipeline.select(signals, budget)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls are fastest (and timings stable on a shared 2-core box) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MIXED = [
    Sample(images=((2, 3),), question=(20, 21, 22), seed=0),
    Sample(images=((3, 3), (1, 2)), question=(23, 24), seed=1),
]


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
    model = tiny_qwen(kind)
    inputs, layouts = batch(MIXED)
    with prune(model, recipe, budget=3) as handle:
        pruned = logits(model, inputs)
        result = handle.last_selection
    assert result.counts.tolist() == [3, 3, 2]
    keep = kept_mask(result, inputs, layouts)
    reference = MaskedReference(model, inputs, keep, from_layer).logits()
    ours, theirs = aligned(pruned, reference, keep)
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)


def drop_masks(result, inputs: dict, layouts) -> list[tuple[int, torch.Tensor]]:
    """(layer, keep mask after that drop) for every drop of a schedule."""
    out = []
    keep = inputs["attention_mask"].bool().clone()
    for record in result.drops:
        keep = keep.clone()
        for r in range(len(result.image_positions)):
            b, positions = int(result.image_sample[r]), result.image_positions[r]
            present = keep[b, positions].clone()
            keep[b, positions] = False
            keep[b, positions[record.selection.row_indices(r)]] = True
            assert bool(present[record.selection.row_indices(r)].all())  # a later drop keeps a subset
        out.append((record.layer, keep))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_schedule_keep_matches_masked_reference(kind):
    model = tiny_qwen(kind)
    inputs, layouts = batch(MIXED)
    with prune(model, SCHEDULE, budget=4) as handle:
        pruned = logits(model, inputs)
        result = handle.last_selection
    assert {k: v.tolist() for k, v in result.per_layer_counts.items()} == {1: [4, 4, 2], 2: [2, 2, 1]}
    (first, keep1), (second, keep2) = drop_masks(result, inputs, layouts)
    assert torch.equal(keep2, kept_mask(result, inputs, layouts))
    reference = MaskedReference(model, inputs, keep1, first, later=[(second, keep2)]).logits()
    ours, theirs = aligned(pruned, reference, keep2)
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)


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
    model = tiny_qwen(kind)
    inputs, layouts = batch([Sample(images=((3, 3),), question=(20, 21, 22, 23))])
    with prune(model, recipe, budget=3, positions="compact") as handle:
        pruned = logits(model, inputs)
        result = handle.last_selection
    keep = kept_mask(result, inputs, layouts)
    if recipe == PRE_LLM:
        torch.testing.assert_close(pruned, compact_reference(model, inputs, keep), atol=TOL, rtol=0)
        return
    # layer(k): layers < k run on everything with the M-RoPE ids; layers >= k see the kept tokens at 0..K-1
    reference = MaskedReference(model, inputs, keep, 2, compact=True).logits()
    ours, theirs = aligned(pruned, reference, keep)
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "recipe,from_layer,positions",
    [(PRE_LLM, 0, "keep"), (LAYER, 2, "keep"), (PRE_LLM, 0, "compact"), (LAYER, 2, "compact"), (VISION, 0, "keep")],
)
def test_generate_matches_reference_and_cache_holds_kept_tokens(kind, recipe, from_layer, positions):
    model = tiny_qwen(kind)
    inputs, layouts = batch(MIXED)
    length, steps = inputs["input_ids"].shape[1], 8
    with prune(model, recipe, budget=3, positions=positions) as handle:
        out = model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        result = handle.last_selection
    keep = kept_mask(result, inputs, layouts)
    tokens, scores = MaskedReference(model, inputs, keep, from_layer, compact=positions == "compact").generate(steps)
    assert torch.equal(out.sequences[:, length:], tokens)
    torch.testing.assert_close(torch.stack(out.logits, 1), scores, atol=TOL, rtol=0)
    # the cache of the layers after the drop holds the kept slots only (+ the generated tokens)
    width = result.sequence_index.shape[1]
    dropped = (inputs["attention_mask"].bool() & ~keep).sum(1)
    assert width == int((length - dropped).max())
    for layer in range(len(model.model.language_model.layers)):
        expected = (width if layer >= from_layer else length) + steps - 1
        assert out.cache.get_seq_length(layer) == expected


@pytest.mark.parametrize("kind", KINDS)
def test_generate_compact_matches_kept_tokens_only(kind):
    model = tiny_qwen(kind)
    inputs, layouts = batch([Sample(images=((3, 3),), question=(20, 21, 22, 23))])
    length = inputs["input_ids"].shape[1]
    with prune(model, PRE_LLM, budget=3, positions="compact") as handle:
        ours = model.generate(
            **inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        keep = kept_mask(handle.last_selection, inputs, layouts)
    reference = compact_reference(model, inputs, keep, steps=8)
    assert torch.equal(ours.sequences[:, length:], reference.argmax(-1))
    torch.testing.assert_close(torch.stack(ours.logits, 1), reference, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "kind,recipe,positions",
    [("qwen2_vl", PRE_LLM, "keep"), ("qwen2_5_vl", LAYER, "keep"), ("qwen2_vl", SCHEDULE, "compact"),
     ("qwen2_5_vl", VISION, "keep")],
)
def test_left_padded_batch_equals_each_sample_alone(kind, recipe, positions):
    """Images of different sizes and counts, a video, left padding: each row as if alone (last-token
    logits and 4 greedy tokens)."""
    model = tiny_qwen(kind)
    samples = MIXED + [Sample(images=((1, 3),), videos=((2, 2, 2),), question=(25,), seed=2)]
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


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("recipe", [LAYER, SCHEDULE, PRE_LLM, VISION])
def test_sdpa_equals_eager(kind, recipe):
    """Same selection (in-LLM attention rows are recomputed under sdpa) and the same logits at every
    real token (padding and filler rows attend to nothing and are left out), for every placement."""
    inputs, layouts = batch(MIXED)
    outputs = {}
    for attn in ("sdpa", "eager"):
        model = tiny_qwen(kind, attn=attn)
        with prune(model, recipe, budget=3) as handle:
            outputs[attn] = (logits(model, inputs), handle.last_selection)
    assert torch.equal(outputs["sdpa"][1].selection.indices, outputs["eager"][1].selection.indices)
    keep = kept_mask(outputs["sdpa"][1], inputs, layouts)
    sdpa, eager = (
        torch.cat([out[b, -int(keep[b].sum()) :] for b in range(keep.shape[0])]) for out, _ in outputs.values()
    )
    torch.testing.assert_close(sdpa, eager, atol=TOL, rtol=0)


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
    model = tiny_qwen("qwen2_5_vl")
    inputs, _ = batch([Sample(images=((3, 3),), question=(20, 21, 22))])
    with prune(model, LAYER, budget=3, positions=positions):
        expected = model.generate(
            **inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        for with_mask in (True, False):
            mask = inputs["attention_mask"]
            with torch.no_grad():
                out = model(**inputs, use_cache=True)
                scores = [out.logits[:, -1]]
                for _ in range(5):
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                    step = {"attention_mask": mask} if with_mask else {}
                    out = model(input_ids=scores[-1].argmax(-1, keepdim=True), cache=out.cache, **step)
                    scores.append(out.logits[:, -1])
            torch.testing.assert_close(torch.stack(scores, 1), torch.stack(expected.logits, 1), atol=TOL, rtol=0)


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

    class NeedsCls:
        placement = compose(PRE_LLM).placement
        requires = frozenset({"visual", "cls_attention"})

        def select(self, signals, budget):  # pragma: no cover - never reached
            raise AssertionError

    with pytest.raises(MissingSignalError, match="cls_attention"):
        prune(model, NeedsCls(), budget=3)
    with pytest.raises(MissingSignalError, match="no CLS token.*pre_llm|pre_llm.*no CLS token"):
        QwenVLAdapter.attach(model, NeedsCls(), 3)
    with pytest.raises(MissingSignalError, match="cls_attention.*placement 'vision'"):
        prune(model, "visionzip", budget=3)  # CLS attention at the vision placement
    with pytest.raises(MissingSignalError, match="Qwen2VLForConditionalGeneration.*cls_attention.*vision.*no CLS"):
        QwenVLAdapter.attach(model, compose("visionzip"), 3)
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
    samples = MIXED + [Sample(images=((1, 3),), videos=((2, 2, 2),), question=(25,), seed=2)]
    inputs, layouts = batch(samples)
    before = logits(model, inputs)
    with prune(model, VISION, budget=1.0):
        assert torch.equal(logits(model, inputs), before)
    recording = Recording(compose(VISION))
    with prune(model, recording, budget=3) as handle:
        pruned = logits(model, inputs)
        result = handle.last_selection
    assert result.counts.tolist() == [3, 3, 2, 3, 3]
    keep = kept_mask(result, inputs, layouts)
    reference = MaskedReference(model, inputs, keep, 0).logits()
    ours, theirs = aligned(pruned, reference, keep)
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)

    signals = recording.signals[-1]
    dv = model.model.visual.merger.ln_q.weight.shape[0]
    assert signals.visual.shape[-1] == dv * MERGE * MERGE
    vlm = model.model
    with torch.no_grad():
        images = vlm.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        videos = vlm.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
        # rows in sequence order: sample 0 image, sample 1 two images, sample 2 image then video
        expected = [images[0], images[1], images[2], images[3], videos[0]]
        for row, tokens in enumerate(expected):
            n = tokens.shape[0]
            assert int(signals.visual_mask[row].sum()) == n
            merged = vlm.visual.merger(signals.visual[row, :n].reshape(-1, dv))
            torch.testing.assert_close(merged, tokens, atol=1e-6, rtol=0)
    if kind == "qwen2_5_vl":
        order = QwenVLAdapter(model).window_order(inputs["image_grid_thw"])
        assert not torch.equal(order, torch.arange(order.numel()))


class ReplaceWithOwnValues:
    """A pipeline whose selection carries ``values`` equal to the kept tokens' own vision features:
    projecting them through the adapter must give back exactly the model's tokens."""

    def __init__(self, recipe: str):
        self.pipeline = compose(recipe)
        self.placement, self.requires = self.pipeline.placement, self.pipeline.requires

    def select(self, signals, budget):
        from dataclasses import replace

        selection = self.pipeline.select(signals, budget)
        return replace(selection, values=selection.gather(signals.visual))


@pytest.mark.parametrize("kind", KINDS)
def test_vision_merged_values_go_through_the_merger(kind):
    model = tiny_qwen(kind)
    inputs, _ = batch(MIXED)
    with prune(model, VISION, budget=3):
        plain = logits(model, inputs)
    with prune(model, ReplaceWithOwnValues(VISION), budget=3) as handle:
        replaced = logits(model, inputs)
        assert handle.last_selection.drops[0].selection.values is not None
    torch.testing.assert_close(replaced, plain, atol=1e-6, rtol=0)


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
