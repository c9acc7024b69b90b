"""Shared pieces of the Qwen-family adapter tests (``test_adapter_qwen.py``: Qwen2-VL / Qwen2.5-VL,
``test_adapter_qwen3_vl.py``: Qwen3-VL): token ids, chat-template-like inputs, and the independent references
(written without the adapter). Tiny random models, CPU, fp32.

- :class:`Sample` / :func:`batch`: left-padded inputs with images and videos; ``timestamps=True`` writes a video
  as Qwen3-VL's processor does (frame by frame, each frame after a timestamp).
- :class:`MaskedReference`: the unpruned model with the dropped tokens masked out of attention (same M-RoPE ids),
  optionally with compact rotary ids and, for Qwen3-VL, with the DeepStack features zeroed.
- :func:`kept_mask`, :func:`drop_masks`, :func:`aligned`: what the adapter kept, and the logits to compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from adapter_fixtures import left_pad
from vtprune.framework import compose, prune

TOL = 1e-5
VOCAB = 64
PAD, END, TURN = 0, 1, 2  # <pad>, <|im_end|> (the text config's EOS), <|im_start|>
VISION_START, VISION_END, IMAGE, VIDEO = 60, 61, 62, 63
SECONDS = 40  # Qwen3-VL timestamp token of frame f: SECONDS + f ("<f.0 seconds>")
MERGE, PATCH, TEMPORAL, CHANNELS = 2, 2, 2, 3
TOKEN_IDS = dict(
    image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END
)

PRE_LLM = "prompt_cosine+critical+fps+split(critical=0.6)+pre_llm"
SCHEDULE = "attention+critical+diversity.none+split+schedule(layers=[1,2],ratio=0.5)"
VISION = "none+critical+fps+vision"


# ------------------------------------------------------------------------------------------------
# Tiny models and inputs
# ------------------------------------------------------------------------------------------------


def text_config(layers: int, interleaved: bool = False, **extra) -> dict:
    """Text config of the tiny models: 4 heads (GQA 4/2) of 8 dims, M-RoPE sections (2, 1, 1) (``interleaved``:
    Qwen3-VL's interleaved M-RoPE)."""
    rope = {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}
    if interleaved:
        rope["mrope_interleaved"] = True
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters=rope,
        max_position_embeddings=512,
        eos_token_id=END,
        pad_token_id=PAD,
        bos_token_id=None,
        **extra,
    )


def build(model_class, config, attn: str, seed: int):
    """``model_class(config)`` with random weights from ``seed``, attention ``attn``, in eval mode."""
    torch.manual_seed(seed)
    model = model_class(config)
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

    def tokens(self, timestamps: bool = False) -> tuple[list[int], list[tuple[str, list[int], tuple[int, int, int]]]]:
        """Chat-template-like ids and the (kind, placeholder positions, grid) of every visual item. A video is one
        run of placeholders between ``<|vision_start|>`` / ``<|vision_end|>`` (Qwen2-VL), or with ``timestamps``
        as Qwen3-VL's processor writes it: ``<|vision_start|>``, then per frame a timestamp, ``<|vision_start|>``,
        h * w placeholders, ``<|vision_end|>``, then ``<|vision_end|>``."""
        ids = [TURN, 5, 6, END, TURN, 7]  # system turn, then "<|im_start|>user"
        items = []
        for h, w in self.images:
            ids.append(VISION_START)
            items.append(("image", list(range(len(ids), len(ids) + h * w)), (1, h, w)))
            ids += [IMAGE] * (h * w) + [VISION_END]
        for t, h, w in self.videos:
            ids.append(VISION_START)
            if timestamps:
                positions = []
                for frame in range(t):
                    ids += [SECONDS + frame, VISION_START]
                    positions += range(len(ids), len(ids) + h * w)
                    ids += [VIDEO] * (h * w) + [VISION_END]
                ids.append(VISION_END)
            else:
                positions = list(range(len(ids), len(ids) + t * h * w))
                ids += [VIDEO] * (t * h * w) + [VISION_END]
            items.append(("video", positions, (t, h, w)))
        ids += list(self.question) + [END, TURN, 8]  # end of turn, "<|im_start|>assistant"
        return ids, items

    def pixels(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        generator = torch.Generator().manual_seed(1000 + self.seed)
        width = CHANNELS * TEMPORAL * PATCH * PATCH
        images = [torch.randn(h * w * MERGE * MERGE, width, generator=generator) for h, w in self.images]
        videos = [torch.randn(t * h * w * MERGE * MERGE, width, generator=generator) for t, h, w in self.videos]
        return images, videos


def tiny_qwen(kind: str = "qwen2_vl", attn: str = "sdpa", seed: int = 0, layers: int = 3):
    """A random Qwen2-VL or Qwen2.5-VL: 4 heads (GQA 4/2) of 8 dims, M-RoPE sections (2, 1, 1)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    text = text_config(layers)
    common = dict(patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, in_channels=CHANNELS)
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, **common)
        config, cls = Qwen2VLConfig(text_config=text, vision_config=vision, **TOKEN_IDS), Qwen2VLForConditionalGeneration
    else:
        # windows of 2 x 2 merged tokens (8 px / merge 2 / patch 2): a 3 x 3 grid is windowed unevenly
        vision = dict(
            depth=2, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2, window_size=8,
            fullatt_block_indexes=[1], tokens_per_second=2, **common,
        )
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **TOKEN_IDS)
        cls = Qwen2_5_VLForConditionalGeneration
    return build(cls, config, attn, seed)


def batch(samples: Sequence[Sample], timestamps: bool = False) -> tuple[dict, list]:
    """Left-padded model inputs and, per sample, its visual items (kind, padded positions, grid); ``timestamps``:
    see `Sample.tokens`."""
    rows, layouts = [], []
    for sample in samples:
        ids, items = sample.tokens(timestamps)
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
    """The unpruned model where dropped tokens are invisible as keys to layers >= ``from_layer`` (then to the
    later drops' layers).

    Per-layer 4-D masks are swapped in with pre-hooks on the reference model's layers (test code only).
    With ``compact=True`` the layers >= ``from_layer`` also get rotary embeddings of the compact ids: the
    kept tokens numbered 0..K-1, then K, K+1, ... for generated tokens. Qwen3-VL: DeepStack features are added
    to every visual token, as in the unpruned model; ``deepstack=False`` zeroes them (to show they matter).
    """

    def __init__(
        self,
        model,
        inputs: dict,
        keep: torch.Tensor,
        from_layer: int = 0,
        later: Sequence = (),
        compact: bool = False,
        deepstack: bool = True,
    ):
        self.model, self.inputs, self.from_layer = model, inputs, from_layer
        self.compact, self.deepstack = compact, deepstack
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


class ReplaceWithOwnValues:
    """A pipeline whose selection carries ``values`` equal to the kept tokens' own vision features (merge units):
    projecting them through the adapter (the patch merger) must give back exactly the model's tokens. Records
    the `Signals` it is given."""

    def __init__(self, recipe: str):
        self.pipeline = compose(recipe)
        self.placement, self.requires, self.signals = self.pipeline.placement, self.pipeline.requires, []

    def select(self, signals, budget):
        from dataclasses import replace

        self.signals.append(signals)
        selection = self.pipeline.select(signals, budget)
        return replace(selection, values=selection.gather(signals.visual))


# ------------------------------------------------------------------------------------------------
# Checks shared by the Qwen-family tests (each asserts; some return what a test checks further)
# ------------------------------------------------------------------------------------------------


def check_keep_positions(model, inputs: dict, layouts, recipe, from_layer: int, counts: list[int]):
    """``positions="keep"``, budget 3, ``recipe`` a string or a pipeline: the kept counts are ``counts`` and every
    kept token's logits equal the masked reference's (dropped tokens masked out from ``from_layer`` on). Returns
    (pruned logits, keep mask)."""
    with prune(model, recipe, budget=3) as handle:
        pruned = logits(model, inputs)
        result = handle.last_selection
    assert result.counts.tolist() == counts
    keep = kept_mask(result, inputs, layouts)
    reference = MaskedReference(model, inputs, keep, from_layer).logits()
    ours, theirs = aligned(pruned, reference, keep)
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)
    return pruned, keep


def check_schedule_keep(model, inputs: dict, layouts, per_layer_counts: dict) -> None:
    """``SCHEDULE`` at budget 4: kept counts per drop layer, and the masked reference with both drops."""
    with prune(model, SCHEDULE, budget=4) as handle:
        pruned = logits(model, inputs)
        result = handle.last_selection
    assert {k: v.tolist() for k, v in result.per_layer_counts.items()} == per_layer_counts
    (first, keep1), (second, keep2) = drop_masks(result, inputs)
    assert torch.equal(keep2, kept_mask(result, inputs, layouts))
    reference = MaskedReference(model, inputs, keep1, first, later=[(second, keep2)]).logits()
    ours, theirs = aligned(pruned, reference, keep2)
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)


def check_compact_positions(model, inputs: dict, layouts, recipe: str, from_layer: int, compact_reference) -> None:
    """``positions="compact"``: at ``PRE_LLM`` the logits equal ``compact_reference(model, inputs, keep)`` (the
    model fed only the kept tokens); at a layer drop, the layers >= ``from_layer`` see the kept tokens at
    positions 0..K-1 (the masked reference with per-layer rotary embeddings)."""
    with prune(model, recipe, budget=3, positions="compact") as handle:
        pruned = logits(model, inputs)
        result = handle.last_selection
    keep = kept_mask(result, inputs, layouts)
    if recipe == PRE_LLM:
        torch.testing.assert_close(pruned, compact_reference(model, inputs, keep), atol=TOL, rtol=0)
        return
    # layer(k): layers < k run on everything with the M-RoPE ids; layers >= k see the kept tokens at 0..K-1
    reference = MaskedReference(model, inputs, keep, from_layer, compact=True).logits()
    ours, theirs = aligned(pruned, reference, keep)
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)


def check_generate(model, inputs: dict, layouts, recipe: str, from_layer: int, positions: str, steps: int = 8) -> None:
    """``generate`` (budget 3) gives the masked reference's greedy tokens and logits, and the cache of the layers
    after the drop holds the kept slots only (+ the generated tokens)."""
    length = inputs["input_ids"].shape[1]
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
    dropped = (inputs["attention_mask"].bool() & ~keep).sum(1)
    assert width == int((length - dropped).max())
    for layer in range(len(model.model.language_model.layers)):
        expected = (width if layer >= from_layer else length) + steps - 1
        assert out.cache.get_seq_length(layer) == expected


def check_generate_compact(model, inputs: dict, layouts, compact_reference, steps: int = 8) -> None:
    """``PRE_LLM`` with ``positions="compact"``: ``generate`` gives the greedy tokens and logits of
    ``compact_reference(model, inputs, keep, steps=steps)`` (the model fed only the kept tokens)."""
    length = inputs["input_ids"].shape[1]
    with prune(model, PRE_LLM, budget=3, positions="compact") as handle:
        ours = model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        keep = kept_mask(handle.last_selection, inputs, layouts)
    reference = compact_reference(model, inputs, keep, steps=steps)
    assert torch.equal(ours.sequences[:, length:], reference.argmax(-1))
    torch.testing.assert_close(torch.stack(ours.logits, 1), reference, atol=TOL, rtol=0)


def check_batch_equals_each_sample_alone(
    model, samples: Sequence[Sample], recipe: str, positions: str, timestamps: bool = False
) -> None:
    """Left padding (budget 3): each row as if alone (last-token logits and 4 greedy tokens)."""
    inputs, _ = batch(samples, timestamps)
    length = inputs["input_ids"].shape[1]
    with prune(model, recipe, budget=3, positions=positions):
        together = logits(model, inputs)[:, -1]
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, length:]
        for b, sample in enumerate(samples):
            alone, _ = batch([sample], timestamps)
            torch.testing.assert_close(logits(model, alone)[:, -1], together[b : b + 1], atol=TOL, rtol=0)
            tokens = model.generate(**alone, max_new_tokens=4, do_sample=False)[:, alone["input_ids"].shape[1] :]
            assert torch.equal(tokens, generated[b : b + 1])


def check_sdpa_equals_eager(tiny, inputs: dict, layouts, recipe: str) -> None:
    """``tiny(attn=...)`` under sdpa and eager (budget 3): the same selection and the same logits at every kept
    real token (padding and filler rows attend to nothing and are left out)."""
    outputs = {}
    for attn in ("sdpa", "eager"):
        model = tiny(attn=attn)
        with prune(model, recipe, budget=3) as handle:
            outputs[attn] = (logits(model, inputs), handle.last_selection)
    assert torch.equal(outputs["sdpa"][1].selection.indices, outputs["eager"][1].selection.indices)
    keep = kept_mask(outputs["sdpa"][1], inputs, layouts)
    sdpa, eager = (
        torch.cat([out[b, -int(keep[b].sum()) :] for b in range(keep.shape[0])]) for out, _ in outputs.values()
    )
    torch.testing.assert_close(sdpa, eager, atol=TOL, rtol=0)


def check_manual_decoding(model, inputs: dict, recipe: str, positions: str, steps: int) -> None:
    """A hand-written decode loop of ``steps`` tokens (no position ids; with or without the unpruned-layout
    mask) gives the logits ``generate`` gives (budget 3)."""
    with prune(model, recipe, budget=3, positions=positions):
        expected = model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        for with_mask in (True, False):
            mask = inputs["attention_mask"]
            with torch.no_grad():
                out = model(**inputs, use_cache=True)
                scores = [out.logits[:, -1]]
                for _ in range(steps - 1):
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                    step = {"attention_mask": mask} if with_mask else {}
                    out = model(input_ids=scores[-1].argmax(-1, keepdim=True), cache=out.cache, **step)
                    scores.append(out.logits[:, -1])
            torch.testing.assert_close(torch.stack(scores, 1), torch.stack(expected.logits, 1), atol=TOL, rtol=0)


def check_merge_units(model, inputs: dict, signals, dv: int) -> None:
    """Every row of ``signals.visual`` (rows in sequence order: the images, then one video, which comes last) is
    the merge units of its LLM tokens: the patch merger maps them to exactly the tokens the model's own
    ``get_image_features`` / ``get_video_features`` give."""
    vlm = model.model
    assert signals.visual.shape[-1] == dv * MERGE * MERGE
    with torch.no_grad():
        images = vlm.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        videos = vlm.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
        for row, tokens in enumerate([*images, videos[0]]):
            n = tokens.shape[0]
            assert int(signals.visual_mask[row].sum()) == n
            merged = vlm.visual.merger(signals.visual[row, :n].reshape(-1, dv))
            torch.testing.assert_close(merged, tokens, atol=1e-6, rtol=0)


def check_own_values_go_through_the_merger(model, inputs: dict) -> ReplaceWithOwnValues:
    """At ``VISION`` (budget 3), a selection whose merged ``values`` are the kept tokens' own merge units gives the
    logits of the plain selection: the adapter projects them through the patch merger. Returns the pipeline
    (its ``signals``)."""
    with prune(model, VISION, budget=3):
        plain = logits(model, inputs)
    own = ReplaceWithOwnValues(VISION)
    with prune(model, own, budget=3) as handle:
        replaced = logits(model, inputs)
        assert handle.last_selection.drops[0].selection.values is not None
    torch.testing.assert_close(replaced, plain, atol=1e-6, rtol=0)
    return own
