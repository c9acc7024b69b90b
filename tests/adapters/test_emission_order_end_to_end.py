"""A `Selection.order` without merged values, end to end (the emission path of ``adapters/decisions.py``: each image's
kept tokens, with their own values, written into the image's first placeholder slots in the selection's order, the
image's other slots dropped). No shipped stage takes this path; the testing kit's ``diversity.norm_order``
(`vtprune.testing.stages.NormOrder`: the largest-norm tokens, emitted in descending norm order) does.

On the tiny LLaVA (two samples, the second with two images), at ``pre_llm`` and at ``layer(k=2)``, under ``keep`` and
``compact`` positions, the pruned forward and greedy decoding equal references built on the unpruned model with plain
torch hooks (no vtprune code): the hidden states entering layer k (the input embeddings for ``pre_llm``) of each
image's first ``count`` placeholder slots replaced by its kept tokens' in emission order, and the image's other slots
masked out of attention from layer k on (`masked_reference`, which also renumbers positions for ``compact``). At
``pre_llm`` with ``compact`` positions the reference is also the model fed only the kept tokens, the unpruned
model's projected image tokens gathered in emission order (``inputs_embeds``). The emission order itself is checked
against the model's own hidden states (descending norm, ``torch.sort``).
"""

from __future__ import annotations

import pytest
import torch

from adapter_fixtures import (
    aligned,
    forward_logits,
    generation_positions,
    llava_inputs,
    masked_reference,
    merged_embeddings,
    single_thread,
    tiny_llava,
)
from vtprune.framework.prune import prune
from vtprune.testing.stages import kit_registry

LAYERS = 4
COUNT = 6  # kept tokens per image (an int budget)
STEPS = 6  # greedy tokens
REGISTRY = kit_registry()
PLACEMENTS = {"pre_llm": ("pre_llm", 0), "layer": ("layer(k=2)", 2)}

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def _recipe(placement: str) -> str:
    return f"relevance.none+critical+norm_order+split(critical=0.0)+{placement}"


@pytest.fixture(scope="module")
def case():
    model = tiny_llava(layers=LAYERS)
    inputs = llava_inputs(model, (1, 2), (5, 3), seed=3)  # sample 1: two images
    return model, inputs


def _images(model, inputs) -> list[tuple[int, torch.Tensor]]:
    """(sample, (n,) placeholder positions) of every image, in batch order (each image is one run of n tokens)."""
    vision = model.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2
    out = []
    for b in range(inputs["input_ids"].shape[0]):
        positions = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().flatten()
        out += [(b, chunk) for chunk in positions.split(tokens)]
    return out


def _entering(model, feed, layer: int) -> torch.Tensor:
    """(B, L, D) the hidden states entering decoder layer ``layer`` of the unpruned model (layer 0: the input
    embeddings)."""
    if layer == 0:
        return merged_embeddings(model, feed)
    with torch.no_grad():
        return model(**feed, output_hidden_states=True).hidden_states[layer]


def _emission(hidden: torch.Tensor, images) -> list[torch.Tensor]:
    """Per image, the original positions of its kept tokens in emission order: its ``COUNT`` largest-norm tokens,
    by descending norm (ties: the earlier position)."""
    out = []
    for b, positions in images:
        norms = hidden[b, positions].float().norm(dim=-1)  # (n,)
        out.append(positions[norms.sort(descending=True, stable=True).indices[:COUNT]])
    return out


class _rewrite:
    """Context manager: a forward pre-hook on decoder layer ``layer`` of the unpruned model that, at the prefill,
    puts into each image's first ``COUNT`` placeholder slots the hidden states of its kept tokens in emission order."""

    def __init__(self, model, layer: int, images, emitted, length: int):
        self.layer, self.images, self.emitted, self.length = model.model.language_model.layers[layer], images, emitted, length

    def _hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] != self.length:  # a decoding step
            return None
        new = hidden.clone()
        for (b, positions), kept in zip(self.images, self.emitted):
            new[b, positions[:COUNT]] = hidden[b, kept]
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    def __enter__(self):
        self.handle = self.layer.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _pruned(model, inputs, placement: str, positions: str):
    feed = {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}
    with prune(model, _recipe(placement), budget=COUNT, positions=positions, registry=REGISTRY) as handle:
        logits = forward_logits(model, feed)
        result = handle.last_selection
        generated = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    return logits, result, generated[:, inputs["input_ids"].shape[1] :]


def _recorded_emission(result, images) -> list[torch.Tensor]:
    """Per image, the original positions the drop's record says were emitted, in its ``order``."""
    (record,) = result.drops
    selection = record.selection
    out = []
    for r, (_, positions) in enumerate(images):
        kept = selection.row_indices(r)  # (k,) image-token indices, ascending
        ranks = selection.order[r][selection.mask[r]]  # (k,) emission rank of each
        out.append(positions[kept[ranks.argsort()]])
    return out


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("where", list(PLACEMENTS))
def test_order_without_values_equals_the_rewritten_and_masked_reference(case, where, positions) -> None:
    model, inputs = case
    placement, layer = PLACEMENTS[where]
    images = _images(model, inputs)
    feed = {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}
    emitted = _emission(_entering(model, feed, layer), images)
    logits, result, tokens = _pruned(model, inputs, placement, positions)
    assert result.counts.tolist() == [COUNT] * len(images)
    assert result.drops[0].selection.values is None and result.drops[0].selection.order is not None
    recorded = _recorded_emission(result, images)
    assert [e.tolist() for e in recorded] == [e.tolist() for e in emitted]
    assert any(e.tolist() != sorted(e.tolist()) for e in emitted)  # not the ascending order
    # the LLM's slots: each image's first COUNT placeholders, in order, then the text
    batch, length = inputs["input_ids"].shape
    removed = torch.zeros(batch, length, dtype=torch.bool)
    for b, positions_ in images:
        removed[b, positions_[COUNT:]] = True
    final = [result.sequence_index[b][result.sequence_mask[b]] for b in range(batch)]
    for b in range(batch):
        real = inputs["attention_mask"][b].bool() & ~removed[b]
        assert final[b][inputs["attention_mask"][b].bool()[final[b]]].tolist() == real.nonzero().flatten().tolist()
    masks = [removed if number >= layer else torch.zeros_like(removed) for number in range(LAYERS)]
    with _rewrite(model, layer, images, emitted, length), masked_reference(model, masks, positions):
        reference = forward_logits(model, feed)
        ref_tokens = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)[:, length:]
    ours, theirs = aligned(logits, result, reference, inputs["attention_mask"])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)


def test_pre_llm_compact_equals_the_projected_tokens_gathered_in_order(case) -> None:
    """The brief's reference: the unpruned model's projected tokens, gathered in emission order into each image's
    place (text as it was, the image's other tokens gone), fed as ``inputs_embeds`` with fresh positions."""
    model, inputs = case
    images = _images(model, inputs)
    embeds = merged_embeddings(model, inputs)  # (B, L, D)
    emitted = _emission(embeds, images)
    logits, result, tokens = _pruned(model, inputs, "pre_llm", "compact")
    rows = []
    for b in range(embeds.shape[0]):
        real = inputs["attention_mask"][b].bool().nonzero().flatten().tolist()
        parts, done = [], set()
        for p in real:
            image = next((i for i, (s, pos) in enumerate(images) if s == b and p in pos.tolist()), None)
            if image is None:
                parts.append(embeds[b, p : p + 1])
            elif image not in done:  # the image's place: its kept tokens in emission order
                parts.append(embeds[b, emitted[image]])
                done.add(image)
        rows.append(torch.cat(parts))  # (n_b, D)
    width = max(r.shape[0] for r in rows)
    ref_embeds = torch.zeros(len(rows), width, embeds.shape[-1], dtype=embeds.dtype)
    ref_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ref_embeds[b, width - r.shape[0] :] = r
        ref_mask[b, width - r.shape[0] :] = 1
    reference = forward_logits(
        model, {"inputs_embeds": ref_embeds, "attention_mask": ref_mask, "position_ids": generation_positions(ref_mask)}
    )
    real = result.sequence_mask & inputs["attention_mask"].bool().gather(1, result.sequence_index)
    torch.testing.assert_close(logits[real], reference[ref_mask.bool()], atol=1e-5, rtol=0)
    with torch.no_grad():
        ref_tokens = model.generate(inputs_embeds=ref_embeds, attention_mask=ref_mask, max_new_tokens=STEPS, do_sample=False)
    assert torch.equal(tokens, ref_tokens)


def test_keep_all_with_an_order_stage_is_the_unpruned_model(case) -> None:
    """A budget covering every token keeps each image whole in its own order (the keep-all rule)."""
    model, inputs = case
    base = forward_logits(model, inputs)
    for placement, _ in PLACEMENTS.values():
        with prune(model, _recipe(placement), budget=1.0, registry=REGISTRY):
            assert torch.equal(forward_logits(model, inputs), base)
