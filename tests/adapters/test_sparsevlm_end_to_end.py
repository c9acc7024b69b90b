"""SparseVLM end to end on the tiny LLaVA.

- Masked-reference proof: the pruned logits and greedy tokens equal the *unpruned* model with, before each sparse
  layer, the image's kept tokens then its recycled (merged) tokens written into the image's first live slots (the
  merged values computed here from the reference's own hidden states: ``sum / (size + 1e-6)`` of the members the
  record assigns) and every other image slot masked out of attention from that layer on.
- The adaptive counts (rank rule + recycled clusters) are reported per image and drop on ``last_selection``.
- A sample gives the same kept set, logits and answer alone as in a left-padded batch.
"""

from __future__ import annotations

import pytest
import torch

from adapter_fixtures import aligned, generation_positions, llava_inputs, masked_reference, single_thread, tiny_llava
from vtprune import framework

REGISTRY = framework.build_registry(autoload=False)
RECIPE = "sparsevlm+sparse_layers(layers=[1,2])"
PARAMS = {"scale": 0.8, "bias": 0.0}  # TextVQA-64's pair: the rank rule prunes the tiny model's 16 tokens
MERGE_EPS = 1e-6  # SparseVLM's cluster_and_merge: sum / (size + 1e-6)
NEW_TOKENS = 4

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=3)


@pytest.fixture(scope="module")
def inputs(model):
    return llava_inputs(model, (1, 1), (5, 3), seed=3)


def _run(model, inputs, positions="keep", params=PARAMS):
    feed = {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}
    with framework.prune(model, RECIPE, budget=64, registry=REGISTRY, positions=positions, **params) as handle, torch.no_grad():
        logits = model(**feed).logits
        result = handle.last_selection
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(handle.last_selection.drops[0].selection.indices, result.drops[0].selection.indices)
    return logits, out, result


class _WriteRecycled:
    """Forward pre-hooks on the decoder layers of the unpruned model: at a drop layer's prefill, each image's live
    slots (its first ``before`` placeholder positions) receive [critical kept tokens ascending, merged tokens
    ascending] computed from the incoming hidden states; records what it wrote (per image) for comparison."""

    def __init__(self, model, result, length):
        self.layers = model.model.language_model.layers
        self.result = result
        self.length = length
        self.handles = []
        self.written = {}

    def __enter__(self):
        for number, record in enumerate(self.result.drops):
            self.handles.append(
                self.layers[record.layer].register_forward_pre_hook(self._hook(number, record), with_kwargs=True)
            )
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _hook(self, number, record):
        selection = record.selection

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] != self.length:  # a decoding step: the cache already holds the prefill's values
                return None
            if selection.assignment is None:  # nothing merged: the rank rule kept every token (nothing dropped)
                assert torch.equal(selection.counts, record.before)
                return None
            hidden = hidden.clone()
            for image, positions in enumerate(self.result.image_positions):
                b = int(self.result.image_sample[image])
                live = positions[: int(record.before[image])]  # the image's live slots, in order
                kept = selection.row_indices(image).tolist()
                critical = selection.critical[image][selection.mask[image]].tolist()
                assignment = selection.assignment[image].tolist()  # image index -> slot of the kept token
                rows = [hidden[b, live[i]].clone() for i, crit in zip(kept, critical) if crit]
                for slot, (i, crit) in enumerate(zip(kept, critical)):
                    if crit:
                        continue
                    members = [j for j in range(live.numel()) if assignment[j] == slot]
                    total = torch.zeros_like(hidden[b, 0])
                    for j in members:
                        total = total + hidden[b, live[j]]
                    rows.append(total / (len(members) + MERGE_EPS))
                for place, row in enumerate(rows):
                    hidden[b, live[place]] = row
                self.written[(number, image)] = torch.stack(rows)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook


def _removed(result, batch, length, layers):
    """(B, L) bool per decoder layer: the image slots gone before that layer (past each drop's kept count)."""
    removed = [torch.zeros(batch, length, dtype=torch.bool) for _ in range(layers)]
    for record in result.drops:
        for image, positions in enumerate(result.image_positions):
            gone = positions[int(record.selection.counts[image]) :]
            for layer in range(record.layer, layers):
                removed[layer][int(result.image_sample[image]), gone] = True
    return removed


#: (inputs seed, scale, bias, whether the second drop removes tokens too): the second case merges at both drops
CASES = [(3, 0.8, 0.0, False), (5, 1.5, 0.0, True)]


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("seed,scale,bias,second_drops", CASES)
def test_pruned_equals_masked_reference_with_recycled_values(model, positions, seed, scale, bias, second_drops):
    inputs = llava_inputs(model, (1, 1), (5, 3), seed=seed)
    logits, out, result = _run(model, inputs, positions, {"scale": scale, "bias": bias})
    batch, length = inputs["input_ids"].shape
    assert [d.layer for d in result.drops] == [1, 2]
    first, second = result.drops[0].selection, result.drops[1].selection
    assert bool((first.counts < 16).all()) and bool((~first.critical[first.mask]).any())  # something was merged
    assert bool((second.counts < result.drops[1].before).any()) == second_drops
    layers = model.config.text_config.num_hidden_layers
    feed = {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}
    writer = _WriteRecycled(model, result, length)
    with torch.no_grad(), writer, masked_reference(model, _removed(result, batch, length, layers), positions):
        reference = model(**feed).logits
        written = dict(writer.written)
        greedy = model.generate(**feed, max_new_tokens=NEW_TOKENS, do_sample=False)
    got, want = aligned(logits, result, reference, inputs["attention_mask"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.equal(out[:, length:], greedy[:, length:])
    # the recorded values are the ones the reference wrote, in kept order (critical first in the written rows)
    for (number, image), rows in written.items():
        selection = result.drops[number].selection
        crit = selection.critical[image][selection.mask[image]]
        values = selection.values[image][selection.mask[image]]
        order = torch.cat([crit.nonzero().flatten(), (~crit).nonzero().flatten()])
        torch.testing.assert_close(values[order], rows.float(), atol=1e-5, rtol=0)


def test_counts_are_adaptive_and_batch_equals_alone(model, inputs):
    logits, out, result = _run(model, inputs)
    first = result.drops[0].selection
    assert first.sizes is not None and int(first.sizes.sum()) <= 16
    for row in range(2):
        keep = inputs["attention_mask"].bool()[row]
        single = {k: (v[row : row + 1, keep] if k in ("input_ids", "attention_mask") else v[row : row + 1]) for k, v in inputs.items()}
        alone_logits, alone_out, alone = _run(model, single)
        for drop, alone_drop in zip(result.drops, alone.drops):
            assert alone_drop.selection.row_indices(0).tolist() == drop.selection.row_indices(row).tolist()
        torch.testing.assert_close(logits[row, -alone_logits.shape[1] :][-1], alone_logits[0, -1], atol=1e-5, rtol=0)
        assert alone_out[0, -NEW_TOKENS:].tolist() == out[row, -NEW_TOKENS:].tolist()
