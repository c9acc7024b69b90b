"""SparseVLM end to end on the tiny LLaVA: the adapter fills ``prompt_attention`` at each sparse layer, the adaptive
counts (rank rule + recycled clusters) are reported per image and drop on ``last_selection``, generate runs, and a
sample gives the same kept set and answer alone as in a batch."""

from __future__ import annotations

import pytest
import torch

from adapter_fixtures import llava_inputs, single_thread, tiny_llava
from vtprune import framework

REGISTRY = framework.build_registry(autoload=False)
RECIPE = "sparsevlm+sparse_layers(layers=[1,2])"

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def _run(model, inputs):
    with framework.prune(model, RECIPE, budget=64, registry=REGISTRY, scale=0.8, bias=0.0) as handle, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        return out, handle.last_selection


def test_counts_are_adaptive_and_batch_equals_alone():
    model = tiny_llava(layers=3)
    inputs = llava_inputs(model, (1, 1), (5, 3), seed=3)
    out, result = _run(model, inputs)
    assert [d.layer for d in result.drops] == [1, 2]
    first = result.drops[0].selection
    assert bool((first.counts < 16).all())  # the rank rule prunes the 16 image tokens
    assert first.sizes is not None and int(first.sizes.sum()) <= 16
    for row in range(2):
        single = {k: v[row : row + 1] for k, v in inputs.items()}
        keep = single["attention_mask"].bool()[0]
        single = {k: (v[:, keep] if k in ("input_ids", "attention_mask") else v) for k, v in single.items()}
        alone_out, alone = _run(model, single)
        assert alone.drops[0].selection.row_indices(0).tolist() == first.row_indices(row).tolist()
        assert alone_out[0, -3:].tolist() == out[row, -3:].tolist()
