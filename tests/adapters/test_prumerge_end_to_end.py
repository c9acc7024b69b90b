"""PruMerge / PruMerge+ end to end on the tiny LLaVA: the adapter's signals (hint ``full_width_cls_attention``: the
CLS row and keys of the tower layer after the feature layer, one full-width head) and what the LLM receives,
against the loop-style official reference (tests/helpers/prumerge_reference.py) run on the tower's own hidden
states. The registry-generated cases (tests/adapters/test_peers_end_to_end.py) add keep-all, batch == alone and
LLaVA-NeXT.
"""

from __future__ import annotations

import pytest
import torch

from adapter_fixtures import IMAGE_TOKEN_ID, llava_inputs, record_hooks, single_thread, tiny_llava
from prumerge_reference import official_attention_and_keys, official_prumerge
from vtprune import framework

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def case():
    model = tiny_llava(layers=2)
    tower = model.model.vision_tower
    last = getattr(tower, "vision_model", tower).encoder.layers[-1].self_attn
    with torch.no_grad():  # sharper CLS attention in the random tower: 1 and 2 IQR outliers in the two images
        last.q_proj.weight.mul_(3.0)
        last.k_proj.weight.mul_(3.0)
    inputs = llava_inputs(model, (1, 1), (5, 3), seed=0)
    return model, inputs


def _official(model, inputs, plus):
    """Per image: the official output sequence (1, L + 1, Dv) and its kept list, from the tower's own states."""
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    with torch.no_grad():
        hidden = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2]  # (images, 1 + n, Dv)
        cls_attn, keys = official_attention_and_keys(layers[len(layers) - 1], hidden)  # the layer after -2
        return [official_prumerge(hidden[r : r + 1, 1:], cls_attn[r : r + 1], keys[r : r + 1], plus) for r in range(2)]


def _lm_inputs(model):
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs.get("inputs_embeds"))

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("preset,plus", [("prumerge", False), ("prumerge_plus", True)])
def test_llm_receives_the_official_merged_tokens(case, preset, plus):
    model, inputs = case
    n = 16
    with framework.prune(model, preset, budget=n - 1) as handle, torch.no_grad():  # a cap above the official count
        seen, hook = _lm_inputs(model)
        try:
            model(**inputs)
        finally:
            hook.remove()
    record = handle.last_selection.drops[0]
    embeds = seen[-1]
    outliers = 0
    for r, (sequence, order) in enumerate(_official(model, inputs, plus)):
        kept = torch.zeros(n, dtype=torch.bool)
        kept[order] = True
        pruned = (~kept).nonzero().flatten()
        outliers += order.numel()
        # our layout: the kept list plus the extra token at the last pruned position, ascending
        positions = torch.cat([order, pruned[-1:]])
        assert record.selection.row_indices(r).tolist() == sorted(positions.tolist())
        by_position = dict(zip(positions.tolist(), sequence[0]))
        want_vision = torch.stack([by_position[p] for p in sorted(by_position)])  # (count, Dv)
        with torch.no_grad():
            want = model.model.multi_modal_projector(want_vision.float())
        image = inputs["input_ids"][r] == IMAGE_TOKEN_ID
        slots = handle.last_selection.sequence_index[r]
        got = embeds[r][image.gather(0, slots) & handle.last_selection.sequence_mask[r]]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert outliers >= 3  # the case exercises the merge (different adaptive counts per image), not only the extra token


def test_feature_layer_without_a_following_layer_is_a_clear_error():
    model = tiny_llava(layers=1)
    model.config.vision_feature_layer = -1  # the tower's last layer: nothing follows it
    model.model.config.vision_feature_layer = -1
    before = record_hooks(model)
    with pytest.raises(ValueError, match="following layer"):
        framework.prune(model, "prumerge", budget=8)
    assert record_hooks(model) == before
