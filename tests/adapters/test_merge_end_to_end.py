"""Merging output and FasterVLM end to end on the tiny LLaVA.

- FasterVLM: the kept tokens are the official rule computed from the tower itself (the penultimate CLIP layer's
  CLS attention, head mean, ``torch.topk``, raster order), and the LLM sees the projected kept tokens only.
- A merging stage at ``pre_llm`` (``diversity.tome_merge``): ``last_selection`` records sizes and the assignment in
  image-token coordinates; the LLM receives, at each kept slot, the size-weighted mean of the projected tokens
  assigned to it (computed here from the model's own embeddings).
"""

from __future__ import annotations

import pytest
import torch

from adapter_fixtures import llava_inputs, merged_embeddings, single_thread, tiny_llava
from vtprune import framework

REGISTRY = framework.build_registry(autoload=False)

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def case():
    model = tiny_llava(layers=3)
    inputs = llava_inputs(model, (1, 2), (5, 3), seed=3)
    return model, inputs


def _image_rows(model, inputs):
    """Per image (row-major over the batch), the (n,) sequence positions of its placeholder tokens."""
    mask = inputs["input_ids"] == model.config.image_token_id
    flat = mask.nonzero()
    n = model.config.vision_config.image_size // model.config.vision_config.patch_size
    per = n * n
    return [flat[i * per : (i + 1) * per] for i in range(flat.shape[0] // per)]


def _penultimate_cls_attention(model, pixel_values):
    """(images, N) FasterVLM scores from the tower: softmax(q_cls k^T * scale) of layer -2, head mean, CLS dropped."""
    tower = model.model.vision_tower
    with torch.no_grad():
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states
    layer = getattr(tower, "vision_model", tower).encoder.layers[-2]
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden[-3])
    heads = model.config.vision_config.num_attention_heads
    q = attn.q_proj(normed[:, :1]).view(normed.shape[0], 1, heads, -1).transpose(1, 2)
    k = attn.k_proj(normed).view(normed.shape[0], normed.shape[1], heads, -1).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(2, 3) * attn.scale, dim=-1, dtype=torch.float32)[:, :, 0]  # (I, H, T)
    return probs[:, :, 1:].mean(dim=1)  # (I, N)


@pytest.mark.parametrize("budget", [1, 5, 9])
def test_fastervlm_keeps_the_official_topk_in_raster_order(case, budget):
    model, inputs = case
    scores = _penultimate_cls_attention(model, inputs["pixel_values"])
    want = torch.zeros_like(scores, dtype=torch.bool)
    want.scatter_(1, torch.topk(scores, k=budget, dim=1)[1], True)  # official: topk, then an index mask
    with framework.prune(model, "fastervlm", budget=budget, registry=REGISTRY) as handle, torch.no_grad():
        model(**inputs)
        result = handle.last_selection
    assert result.drops[0].where == "pre_llm"
    for image in range(want.shape[0]):
        assert result.selection.row_indices(image).tolist() == want[image].nonzero().flatten().tolist()


def test_merging_stage_records_sizes_and_assignment(case):
    model, inputs = case
    recipe = "relevance.none+diversity.tome_merge+placement.pre_llm"
    with torch.no_grad():
        embeds = merged_embeddings(model, inputs)  # (B, L, D) unpruned decoder input
    captured = {}

    def grab(module, args, kwargs):
        captured["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    layer0 = model.model.language_model.layers[0]
    with framework.prune(model, recipe, budget=5, registry=REGISTRY) as handle, torch.no_grad():
        hook = layer0.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model(**inputs)
        finally:
            hook.remove()
        result = handle.last_selection
    record = result.drops[0]
    selection = record.selection
    assert selection.sizes is not None and selection.assignment is not None
    rows = _image_rows(model, inputs)
    for image, positions in enumerate(rows):
        tokens = positions.shape[0]
        kept = selection.row_indices(image)
        sizes = selection.sizes[image][selection.mask[image]]
        slots = selection.assignment[image, :tokens]
        assert kept.numel() == 5 and int(sizes.sum()) == tokens  # every token is merged somewhere
        assert torch.equal(slots[kept], torch.arange(5))  # a kept token is its own slot
        assert torch.equal(torch.bincount(slots, minlength=5), sizes)
        b = int(positions[0, 0])
        original = embeds[b, positions[:, 1]].float()  # (n, D)
        for slot in range(5):
            mean = original[slots == slot].mean(dim=0)
            torch.testing.assert_close(selection.values[image, slot], mean, atol=1e-5, rtol=1e-5)
            where = (result.sequence_index[b] == positions[int(kept[slot]), 1]) & result.sequence_mask[b]
            got = captured["hidden"][b, where.nonzero().flatten()[0]]  # what the first decoder layer receives
            torch.testing.assert_close(got, mean, atol=1e-5, rtol=1e-5)
