"""Qwen3-VL adapter against independent references (tiny random model, CPU, fp32, one thread).

DeepStack: the unpruned model adds the i-th DeepStack features to every visual token after decoder layer i. The
references are written without the adapter: the unpruned model with the dropped tokens masked out of attention
in the affected layers (same M-RoPE ids from ``get_rope_index``). Masking does not stop DeepStack from adding
features to the dropped tokens' own hidden states, but nobody attends to them, so the logits of the kept tokens
must equal the pruned model's, where a kept token receives exactly its own features and a dropped one is gone.
``compact`` at ``pre_llm``: the text model fed only the kept tokens as embeddings together with their own
DeepStack rows (``visual_pos_masks`` / ``deepstack_visual_embeds`` built here from the model's own
``get_image_features`` / ``get_video_features``). Tolerance: 1e-5 absolute on logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pytest
import torch

from adapter_fixtures import left_pad, record_hooks, single_thread
from vtprune.adapters.qwen3_vl import DeepstackFeed, Qwen3VLAdapter, find_visual_items, refine_item
from vtprune.framework import MissingSignalError, VtpruneError, compose, prune

TOL = 1e-5
VOCAB = 64
PAD, END, TURN = 0, 1, 2  # <pad>, <|im_end|> (the text config's EOS), <|im_start|>
VISION_START, VISION_END, IMAGE, VIDEO = 60, 61, 62, 63
SECONDS = 40  # timestamp token of frame f: SECONDS + f ("<f.0 seconds>")
MERGE, PATCH, TEMPORAL, CHANNELS = 2, 2, 2, 3
DEEPSTACK = [0, 1]  # vision blocks whose merged features are added after decoder layers 0 and 1

PRE_LLM = "prompt_cosine+critical+fps+split(critical=0.6)+pre_llm"
LAYER_IN = "attention+critical+diversity.none+split+layer(k=1)"  # deepstack after layer 1 sees the pruned sequence
LAYER_AFTER = "attention+critical+diversity.none+split+layer(k=2)"  # after every deepstack layer
SCHEDULE = "attention+critical+diversity.none+split+schedule(layers=[1,2],ratio=0.5)"
VISION = "none+critical+fps+vision"

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


# ------------------------------------------------------------------------------------------------
# Tiny model and inputs
# ------------------------------------------------------------------------------------------------


def tiny_qwen3(attn: str = "sdpa", seed: int = 0, layers: int = 3):
    """A random ``Qwen3VLForConditionalGeneration``: text 4 heads (GQA 4/2) of 8 dims, q/k norms, interleaved
    M-RoPE sections (2, 1, 1); vision 2 blocks of width 16, a 4 x 4 learned position grid, DeepStack on both
    blocks (added after decoder layers 0 and 1)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, eos_token_id=END, pad_token_id=PAD,
        bos_token_id=None,
        rope_parameters={
            "rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True, "rope_theta": 1e4
        },
    )
    vision = dict(
        depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, num_position_embeddings=16,
        deepstack_visual_indexes=DEEPSTACK, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
        in_channels=CHANNELS,
    )
    config = Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    model.set_attn_implementation(attn)
    model.eval()
    model.generation_config.eos_token_id = None  # random tiny models emit EOS early; tests want 8 steps
    model.generation_config.pad_token_id = PAD
    return model


@dataclass(frozen=True)
class Sample:
    """One prompt: images as (h, w) and videos as (t, h, w) in merged LLM tokens, a question. A video is written
    as Qwen3-VL's processor writes it: ``<|vision_start|>``, then per frame a timestamp, ``<|vision_start|>``,
    h * w placeholders, ``<|vision_end|>``, then ``<|vision_end|>``."""

    images: tuple = ((2, 3),)
    videos: tuple = ()
    question: tuple = (20, 21, 22)
    seed: int = 0

    def tokens(self) -> tuple[list[int], list[tuple[str, list[int], tuple[int, int, int]]]]:
        ids = [TURN, 5, 6, END, TURN, 7]  # system turn, then "<|im_start|>user"
        items = []
        for h, w in self.images:
            ids.append(VISION_START)
            items.append(("image", list(range(len(ids), len(ids) + h * w)), (1, h, w)))
            ids += [IMAGE] * (h * w) + [VISION_END]
        for t, h, w in self.videos:
            positions = []
            ids.append(VISION_START)
            for frame in range(t):
                ids += [SECONDS + frame, VISION_START]
                positions += range(len(ids), len(ids) + h * w)
                ids += [VIDEO] * (h * w) + [VISION_END]
            ids.append(VISION_END)
            items.append(("video", positions, (t, h, w)))
        ids += list(self.question) + [END, TURN, 8]  # end of turn, "<|im_start|>assistant"
        return ids, items

    def pixels(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        generator = torch.Generator().manual_seed(1000 + self.seed)
        width = CHANNELS * TEMPORAL * PATCH * PATCH
        images = [torch.randn(h * w * MERGE * MERGE, width, generator=generator) for h, w in self.images]
        videos = [torch.randn(t * h * w * MERGE * MERGE, width, generator=generator) for t, h, w in self.videos]
        return images, videos


def batch(samples: Sequence[Sample]) -> tuple[dict, list]:
    """Left-padded model inputs and, per sample, its visual items (kind, padded positions, grid)."""
    rows, layouts = [], []
    for sample in samples:
        ids, items = sample.tokens()
        rows.append(ids)
        layouts.append(items)
    ids, mask = left_pad(rows, PAD)
    width = ids.shape[1]
    layouts = [[(k, [p + width - len(r) for p in ps], g) for k, ps, g in items] for r, items in zip(rows, layouts)]
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


MIXED = [
    Sample(images=((2, 3),), question=(20, 21, 22), seed=0),
    Sample(images=((3, 3), (1, 2)), question=(23, 24), seed=1),
]
WITH_VIDEO = MIXED + [Sample(images=((1, 3),), videos=((2, 2, 2),), question=(25,), seed=2)]


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
    """The unpruned model (DeepStack included, on every visual token) where dropped tokens are invisible as keys
    to layers >= ``from_layer`` (then to the later drops' layers). Per-layer 4-D masks are swapped in with
    pre-hooks on the reference's layers (test code only). ``compact=True``: layers >= ``from_layer`` get rotary
    embeddings of the kept tokens numbered 0..K-1 (then K, K+1, ... for generated tokens). ``deepstack=False``
    zeroes the DeepStack features (to show they matter)."""

    def __init__(self, model, inputs: dict, keep, from_layer: int = 0, later: Sequence = (), compact: bool = False,
                 deepstack: bool = True):
        self.model, self.inputs, self.from_layer = model, inputs, from_layer
        self.compact, self.deepstack = compact, deepstack
        self.real = inputs["attention_mask"].bool()
        self.keep = keep & self.real
        self.positions = rope_positions(model, inputs)
        self.keys = [(0, self.real)] + [(layer, k & self.real) for layer, k in ((from_layer, keep), *later)]

    def _forward(self, query_len: int, compact_ids: torch.Tensor, **kwargs):
        total = self.keys[0][1].shape[1]
        causal = torch.ones(total, total, dtype=torch.bool).tril()[-query_len:]
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
        if not self.deepstack:
            def zero(module, args, kw):
                if kw.get("deepstack_visual_embeds") is not None:
                    kw = {**kw, "deepstack_visual_embeds": [torch.zeros_like(f) for f in kw["deepstack_visual_embeds"]]}
                return args, kw
            handles.append(stack.register_forward_pre_hook(zero, with_kwargs=True))
        try:
            return self.model(attention_mask=masks[0][1], **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    def logits(self) -> torch.Tensor:
        inputs = {k: v for k, v in self.inputs.items() if k != "attention_mask"}
        compact_ids = (self.keep.long().cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            out = self._forward(self.keep.shape[1], compact_ids, position_ids=self.positions, use_cache=False, **inputs)
        return out.logits

    def generate(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy tokens (B, steps) and logits (B, steps, V); new tokens at the last prompt id + 1 (compact: at K)."""
        inputs = {k: v for k, v in self.inputs.items() if k != "attention_mask"}
        following = self.positions.amax(dim=(0, 2)) + 1
        kept = self.keep.sum(1)
        compact_ids = (self.keep.long().cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            out = self._forward(self.keep.shape[1], compact_ids, position_ids=self.positions, use_cache=True, **inputs)
            scores = [out.logits[:, -1]]
            for step in range(1, steps):
                ones = torch.ones(self.keep.shape[0], 1, dtype=torch.bool)
                self.keys = [(layer, torch.cat([keys, ones], 1)) for layer, keys in self.keys]
                position = (following + step - 1).view(1, -1, 1).expand(3, -1, 1)
                token = scores[-1].argmax(-1, keepdim=True)
                ids = (kept + step - 1).unsqueeze(1)
                out = self._forward(1, ids, input_ids=token, position_ids=position, cache=out.cache)
                scores.append(out.logits[:, -1])
        scores = torch.stack(scores, dim=1)
        return scores.argmax(-1), scores


def vision_inputs(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """What ``Qwen3VLModel.forward`` hands its text model, rebuilt from the model's public feature methods:
    the merged embeddings (B, L, D), the visual mask (B, L) and one (n_visual, D) DeepStack tensor per layer
    (rows in row-major order of the mask)."""
    ids = inputs["input_ids"]
    vlm = model.model
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids).clone()
        visual = (ids == IMAGE) | (ids == VIDEO)
        deepstack = [torch.zeros(int(visual.sum()), embeds.shape[-1]) for _ in DEEPSTACK]
        rank = visual.flatten().long().cumsum(0).view_as(visual) - 1
        kinds = ((IMAGE, "pixel_values", "image_grid_thw"), (VIDEO, "pixel_values_videos", "video_grid_thw"))
        for token, pixels, grid in kinds:
            if pixels not in inputs:
                continue
            get = vlm.get_image_features if token == IMAGE else vlm.get_video_features
            out = get(inputs[pixels], inputs[grid])
            embeds[ids == token] = torch.cat(out.pooler_output)
            for layer, features in enumerate(out.deepstack_features):
                deepstack[layer][rank[ids == token]] = torch.cat(features)
    return embeds, visual, deepstack


def compact_reference(model, inputs: dict, keep: torch.Tensor, steps: int = 0) -> torch.Tensor:
    """The text model fed only the kept tokens of one unpadded sample, each visual one with its own DeepStack
    rows (positions 0..K-1, the text model's default): logits (1, K, V), or the logits of ``steps`` greedy steps."""
    assert keep.shape[0] == 1 and bool(inputs["attention_mask"].all())
    embeds, visual, deepstack = vision_inputs(model, inputs)
    rank = visual.flatten().long().cumsum(0).view_as(visual) - 1
    rows = rank[keep & visual]
    kept = embeds[keep].unsqueeze(0)
    mask = (visual & keep)[keep].unsqueeze(0)
    stack = model.model.language_model
    with torch.no_grad():
        out = stack(inputs_embeds=kept, visual_pos_masks=mask, deepstack_visual_embeds=[d[rows] for d in deepstack],
                    use_cache=bool(steps))
        if not steps:
            return model.lm_head(out.last_hidden_state)
        scores = [model.lm_head(out.last_hidden_state[:, -1])]
        cache = out.cache
        for _ in range(1, steps):
            token = scores[-1].argmax(-1, keepdim=True)
            out = stack(inputs_embeds=model.get_input_embeddings()(token), cache=cache, use_cache=True)
            cache = out.cache
            scores.append(model.lm_head(out.last_hidden_state[:, -1]))
    return torch.stack(scores, 1)


def kept_mask(result, inputs: dict, layouts) -> torch.Tensor:
    """(B, L) bool: real tokens minus the visual tokens the adapter reports dropped; also checks that the
    reported rows are the items the test built (a video's positions are all its frames')."""
    keep = inputs["attention_mask"].bool().clone()
    expected = [(b, positions) for b, items in enumerate(layouts) for _, positions, _ in items]
    assert len(result.image_positions) == len(expected)
    for r, (b, positions) in enumerate(expected):
        assert int(result.image_sample[r]) == b
        assert result.image_positions[r].tolist() == positions
        keep[b, result.image_positions[r]] = False
        keep[b, result.kept_positions(r)] = True
    return keep


def drop_masks(result, inputs: dict) -> list[tuple[int, torch.Tensor]]:
    """(layer, keep mask after that drop) for every drop of a schedule."""
    out = []
    keep = inputs["attention_mask"].bool().clone()
    for record in result.drops:
        keep = keep.clone()
        for r, positions in enumerate(result.image_positions):
            b = int(result.image_sample[r])
            present = keep[b, positions].clone()
            keep[b, positions] = False
            keep[b, positions[record.selection.row_indices(r)]] = True
            assert bool(present[record.selection.row_indices(r)].all())  # a later drop keeps a subset
        out.append((record.layer, keep))
    return out


def aligned(pruned: torch.Tensor, reference: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pruned logits (B, W, V) at the kept real tokens (right-aligned) and the reference's (B, L, V) at the same
    tokens, as two (n, V) tensors."""
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
    """A pipeline wrapper that records the `Signals` it is given."""

    def __init__(self, pipeline):
        self.pipeline, self.signals = pipeline, []
        self.placement, self.requires = pipeline.placement, pipeline.requires

    def select(self, signals, budget):
        self.signals.append(signals)
        return self.pipeline.select(signals, budget)


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


def test_keep_all_is_bit_identical_for_every_placement_and_removal_restores_hooks():
    model = tiny_qwen3()
    inputs, _ = batch(WITH_VIDEO)
    before, hooks = logits(model, inputs), record_hooks(model)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    for recipe in (PRE_LLM, LAYER_IN, LAYER_AFTER, SCHEDULE.replace("ratio=0.5", "ratio=1.0"), VISION):
        handle = prune(model, recipe, budget=1.0)
        assert handle.adapter is Qwen3VLAdapter
        assert torch.equal(logits(model, inputs), before), recipe
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), generated), recipe
        assert handle.last_selection.counts.tolist() == [6, 9, 2, 3, 8]
        handle.remove()
        assert record_hooks(model) == hooks
    assert torch.equal(logits(model, inputs), before)


@pytest.mark.parametrize(
    "recipe,from_layer",
    [(PRE_LLM, 0), (LAYER_IN, 1), (LAYER_AFTER, 2), (VISION, 0)],
    ids=["pre_llm", "layer1", "layer2", "vision"],
)
def test_keep_positions_match_masked_reference(recipe, from_layer):
    """Images of different sizes and counts and a timestamped video, left padded: every kept token's logits equal
    the unpruned model's with the dropped tokens masked out from ``from_layer`` on (DeepStack on in both)."""
    model = tiny_qwen3()
    inputs, layouts = batch(WITH_VIDEO)
    with prune(model, recipe, budget=3) as handle:
        pruned = logits(model, inputs)
        result = handle.last_selection
    assert result.counts.tolist() == [3, 3, 2, 3, 3]
    keep = kept_mask(result, inputs, layouts)
    reference = MaskedReference(model, inputs, keep, from_layer).logits()
    ours, theirs = aligned(pruned, reference, keep)
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)
    if recipe == LAYER_IN:  # not vacuous: without DeepStack the kept tokens' logits are far off
        plain = MaskedReference(model, inputs, keep, from_layer, deepstack=False).logits()
        assert (ours - aligned(pruned, plain, keep)[1]).abs().max() > 1e-3


def test_schedule_keep_matches_masked_reference():
    model = tiny_qwen3()
    inputs, layouts = batch(WITH_VIDEO)
    with prune(model, SCHEDULE, budget=4) as handle:
        pruned = logits(model, inputs)
        result = handle.last_selection
    assert {k: v.tolist() for k, v in result.per_layer_counts.items()} == {1: [4, 4, 2, 3, 4], 2: [2, 2, 1, 2, 2]}
    (first, keep1), (second, keep2) = drop_masks(result, inputs)
    assert torch.equal(keep2, kept_mask(result, inputs, layouts))
    reference = MaskedReference(model, inputs, keep1, first, later=[(second, keep2)]).logits()
    ours, theirs = aligned(pruned, reference, keep2)
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)


@pytest.mark.parametrize("recipe", [PRE_LLM, LAYER_IN], ids=["pre_llm", "layer1"])
def test_compact_positions(recipe):
    """pre_llm: equals the text model fed only the kept tokens with their own DeepStack rows; layer(1): the
    masked reference with rotary embeddings of 0..K-1 in layers >= 1."""
    model = tiny_qwen3()
    inputs, layouts = batch([Sample(images=((3, 3),), videos=((2, 1, 2),), question=(20, 21, 22, 23))])
    with prune(model, recipe, budget=3, positions="compact") as handle:
        pruned = logits(model, inputs)
        result = handle.last_selection
    keep = kept_mask(result, inputs, layouts)
    if recipe == PRE_LLM:
        torch.testing.assert_close(pruned, compact_reference(model, inputs, keep), atol=TOL, rtol=0)
        return
    reference = MaskedReference(model, inputs, keep, 1, compact=True).logits()
    ours, theirs = aligned(pruned, reference, keep)
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "recipe,from_layer,positions",
    [(PRE_LLM, 0, "keep"), (LAYER_IN, 1, "keep"), (LAYER_AFTER, 2, "compact"), (VISION, 0, "keep")],
    ids=["pre_llm", "layer1", "layer2-compact", "vision"],
)
def test_generate_matches_reference_and_cache_holds_kept_tokens(recipe, from_layer, positions):
    model = tiny_qwen3()
    inputs, layouts = batch(WITH_VIDEO)
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
    width = result.sequence_index.shape[1]
    assert width == int((length - (inputs["attention_mask"].bool() & ~keep).sum(1)).max())
    for layer in range(len(model.model.language_model.layers)):
        assert out.cache.get_seq_length(layer) == (width if layer >= from_layer else length) + steps - 1


def test_generate_compact_pre_llm_matches_kept_tokens_only():
    model = tiny_qwen3()
    inputs, layouts = batch([Sample(images=((3, 3),), videos=((2, 1, 2),), question=(20, 21, 22, 23))])
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
    "recipe,positions", [(PRE_LLM, "keep"), (LAYER_IN, "keep"), (SCHEDULE, "compact"), (VISION, "keep")],
    ids=["pre_llm", "layer1", "schedule-compact", "vision"],
)
def test_left_padded_batch_equals_each_sample_alone(recipe, positions):
    """Image sizes, image counts, a video, left padding: each row as if alone (last-token logits, 4 greedy tokens)."""
    model = tiny_qwen3()
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


@pytest.mark.parametrize(
    "recipe", [PRE_LLM, LAYER_IN, SCHEDULE, VISION], ids=["pre_llm", "layer1", "schedule", "vision"]
)
def test_sdpa_equals_eager(recipe):
    inputs, layouts = batch(WITH_VIDEO)
    outputs = {}
    for attn in ("sdpa", "eager"):
        model = tiny_qwen3(attn=attn)
        with prune(model, recipe, budget=3) as handle:
            outputs[attn] = (logits(model, inputs), handle.last_selection)
    assert torch.equal(outputs["sdpa"][1].selection.indices, outputs["eager"][1].selection.indices)
    keep = kept_mask(outputs["sdpa"][1], inputs, layouts)
    sdpa, eager = (
        torch.cat([out[b, -int(keep[b].sum()) :] for b in range(keep.shape[0])]) for out, _ in outputs.values()
    )
    torch.testing.assert_close(sdpa, eager, atol=TOL, rtol=0)


@pytest.mark.parametrize("recipe", [PRE_LLM, LAYER_IN], ids=["pre_llm", "layer1"])
def test_deepstack_feed_follows_the_segments(recipe):
    """What the text model receives. pre_llm: the mask over the compacted sequence and, per DeepStack layer,
    exactly the kept tokens' rows. layer(1): the model's own mask and features, a length cut at 1 once the drop
    has happened (the model adds layer 0's features itself), and for layer 1 the kept tokens' rows over the
    shortened sequence (added by the adapter). The model's own tensors are never modified; backward works."""
    model = tiny_qwen3()
    inputs, layouts = batch(MIXED)
    seen, original = {}, {}

    def spy(module, args, kwargs):  # runs after the adapter's hooks (registered later)
        seen["mask"], seen["feed"] = kwargs["visual_pos_masks"], kwargs["deepstack_visual_embeds"]

    def model_inputs(module, args, kwargs):  # what Qwen3VLModel passes, captured before any hook of the adapter
        original["mask"] = kwargs["visual_pos_masks"].clone()
        original["features"] = [f.clone() for f in kwargs["deepstack_visual_embeds"]]
        original["objects"] = (kwargs["visual_pos_masks"], list(kwargs["deepstack_visual_embeds"]))

    stack = model.model.language_model
    first = stack.register_forward_pre_hook(model_inputs, with_kwargs=True, prepend=True)
    with prune(model, recipe, budget=3) as handle:
        last = stack.register_forward_pre_hook(spy, with_kwargs=True)
        model(**inputs, use_cache=False).logits.square().sum().backward()  # autograd: nothing modified in place
        result = handle.last_selection
        last.remove()
    first.remove()
    assert model.model.visual.deepstack_merger_list[1].linear_fc2.weight.grad.abs().sum() > 0
    feed, (mask, features) = seen["feed"], original["objects"]
    assert isinstance(feed, DeepstackFeed)
    assert torch.equal(mask, original["mask"])
    assert all(torch.equal(a, b) for a, b in zip(features, original["features"]))
    keep = kept_mask(result, inputs, layouts)
    rows = keep[original["mask"]]  # kept visual tokens among the model's visual rows (row-major)
    index, valid = result.sequence_index, result.sequence_mask
    shortened = original["mask"].gather(1, index) & valid  # visual slots of the pruned sequence
    if recipe == PRE_LLM:
        assert len(feed) == len(DEEPSTACK) and torch.equal(seen["mask"], shortened)
        for layer in range(len(DEEPSTACK)):
            torch.testing.assert_close(feed[layer], features[layer][rows], atol=0, rtol=0)
            assert feed.after_layer(layer) is None
        return
    assert len(feed) == 1 and seen["mask"] is mask and feed[0] is features[0]
    with pytest.raises(RuntimeError, match="after a drop"):
        feed[1]
    slots, added = feed.after_layer(1)
    assert torch.equal(slots, shortened)
    torch.testing.assert_close(added, features[1][rows], atol=0, rtol=0)


def test_items_prompt_span_and_signals():
    """A video is one row over all its frames; the prompt span leaves out the frame timestamps."""
    model = tiny_qwen3()
    samples = [Sample(images=((2, 2),), videos=((3, 1, 2),), question=(20, 21), seed=3)]
    inputs, layouts = batch(samples)
    recording = Recording(compose(PRE_LLM))
    with prune(model, recording, budget=0.5) as handle:
        logits(model, inputs)
        result = handle.last_selection
    assert result.num_tokens.tolist() == [4, 6] and result.counts.tolist() == [2, 3]
    kept_mask(result, inputs, layouts)
    signals = recording.signals[-1]
    assert signals.prompt_mask.sum(1).tolist() == [2, 2]  # the question only: no timestamps, no vision tokens
    embed = model.get_input_embeddings().weight
    torch.testing.assert_close(signals.prompt[0, :2], embed[[20, 21]], atol=0, rtol=0)
    assert signals.grids.tolist() == [[2, 2], [0, 0]]  # the image's grid; a video has none

    ids = inputs["input_ids"]
    items = find_visual_items(ids, [(1, 2, 2)], [(3, 1, 2)], image_token_id=IMAGE, video_token_id=VIDEO)
    assert [list(item.positions()) for item in items] == [positions for _, positions, _ in layouts[0]]
    counted = find_visual_items(ids, [4], [6], image_token_id=IMAGE, video_token_id=VIDEO)  # generate: counts only
    assert [item.pieces for item in counted] == [item.pieces for item in items]
    refined = [refine_item(item, rope_positions(model, inputs)) for item in counted]
    assert [item.grid for item in refined] == [(1, 2, 2), (3, 1, 2)]
    in_generate = Recording(compose(PRE_LLM))
    with prune(model, in_generate, budget=0.5):
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert in_generate.signals[-1].grids.tolist() == [[2, 2], [0, 0]]
    assert in_generate.signals[-1].prompt_mask.sum(1).tolist() == [2, 2]
    with pytest.raises(ValueError):
        find_visual_items(ids, [(1, 2, 2)], [(2, 1, 3)], image_token_id=IMAGE, video_token_id=VIDEO)


def test_base_model_and_errors():
    """``Qwen3VLModel`` is supported too (same hidden states as the pruned full model); no CLS signals."""
    model = tiny_qwen3()
    inputs, _ = batch(MIXED)
    with prune(model, LAYER_IN, budget=3):
        full = logits(model, inputs)
    with prune(model.model, LAYER_IN, budget=3) as handle:
        assert handle.adapter is Qwen3VLAdapter
        with torch.no_grad():
            hidden = model.model(**inputs, use_cache=False).last_hidden_state
    torch.testing.assert_close(model.lm_head(hidden).detach(), full, atol=TOL, rtol=0)

    class NeedsCls:
        placement = compose(PRE_LLM).placement
        requires = frozenset({"visual", "cls_attention"})

        def select(self, signals, budget):  # pragma: no cover - never reached
            raise AssertionError

    with pytest.raises(MissingSignalError, match="cls_attention"):
        prune(model, NeedsCls(), budget=3)
    with pytest.raises(MissingSignalError, match="Qwen3VLForConditionalGeneration.*cls_attention.*vision.*no CLS"):
        Qwen3VLAdapter.attach(model, compose("visionzip"), 3)
    with pytest.raises(MissingSignalError, match="cls_attention.*placement 'vision'.*no CLS token"):
        prune(model, "visionzip", budget=3)
    with pytest.raises(VtpruneError, match="pre_llm_clip' \\(Qwen3-VL's tower is not a CLIP model"):
        prune(model, "cdpruner", budget=3, clip_model=object())
    ids = torch.tensor([[TURN, 5, 6, END, TURN, 20, 21, 22]])
    before = logits(model, {"input_ids": ids})
    with prune(model, LAYER_IN, budget=3):  # text only: untouched
        assert torch.equal(logits(model, {"input_ids": ids}), before)


class ReplaceWithOwnValues:
    """A vision pipeline whose selection carries ``values`` equal to the kept tokens' own merge units: projected
    by the adapter (the main patch merger), they give back exactly the model's tokens."""

    def __init__(self):
        self.pipeline = compose(VISION)
        self.placement, self.requires, self.signals = self.pipeline.placement, self.pipeline.requires, []

    def select(self, signals, budget):
        from dataclasses import replace

        self.signals.append(signals)
        selection = self.pipeline.select(signals, budget)
        return replace(selection, values=selection.gather(signals.visual))


def test_vision_rows_are_merge_units_and_values_go_through_the_merger():
    model = tiny_qwen3()
    inputs, _ = batch(WITH_VIDEO)
    with prune(model, VISION, budget=3):
        plain = logits(model, inputs)
    own = ReplaceWithOwnValues()
    with prune(model, own, budget=3) as handle:
        replaced = logits(model, inputs)
        assert handle.last_selection.drops[0].selection.values is not None
    torch.testing.assert_close(replaced, plain, atol=1e-6, rtol=0)
    signals, vlm = own.signals[-1], model.model
    dv = model.config.vision_config.hidden_size
    assert signals.visual.shape[-1] == dv * MERGE * MERGE
    with torch.no_grad():
        images = vlm.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        videos = vlm.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
        for row, tokens in enumerate([*images, videos[0]]):  # rows in sequence order; the video comes last
            n = tokens.shape[0]
            assert int(signals.visual_mask[row].sum()) == n
            merged = vlm.visual.merger(signals.visual[row, :n].reshape(-1, dv))
            torch.testing.assert_close(merged, tokens, atol=1e-6, rtol=0)


@pytest.mark.parametrize("positions", ["keep", "compact"])
def test_manual_decoding_without_position_ids_follows_rope_deltas(positions):
    """A hand-written decode loop (no position ids; with or without the unpruned-layout mask) gives the tokens
    ``generate`` gives."""
    model = tiny_qwen3()
    inputs, _ = batch([Sample(images=((3, 3),), videos=((2, 1, 2),), question=(20, 21, 22))])
    with prune(model, LAYER_IN, budget=3, positions=positions):
        expected = model.generate(
            **inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        for with_mask in (True, False):
            mask = inputs["attention_mask"]
            with torch.no_grad():
                out = model(**inputs, use_cache=True)
                scores = [out.logits[:, -1]]
                for _ in range(4):
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                    step = {"attention_mask": mask} if with_mask else {}
                    out = model(input_ids=scores[-1].argmax(-1, keepdim=True), cache=out.cache, **step)
                    scores.append(out.logits[:, -1])
            torch.testing.assert_close(torch.stack(scores, 1), torch.stack(expected.logits, 1), atol=TOL, rtol=0)


@pytest.mark.parametrize("recipe", [PRE_LLM, LAYER_IN, VISION], ids=["pre_llm", "layer1", "vision"])
def test_bfloat16_model_runs(recipe):
    model = tiny_qwen3().to(torch.bfloat16)
    inputs, _ = batch(WITH_VIDEO)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    with prune(model, recipe, budget=3) as handle:
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert handle.last_selection.counts.tolist() == [3, 3, 2, 3, 3]
    assert out.shape == (len(WITH_VIDEO), inputs["input_ids"].shape[1] + 2)


def test_module_docstring_examples_run():
    import doctest

    import vtprune.adapters.qwen3_vl as module

    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0
