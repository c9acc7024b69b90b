"""FlowCut's maths (strategies/functional/flowcut.py) against the official functions re-told in
tests/helpers/flowcut_reference.py (``compute_score``, ``adaptive_prune_ratio``, the ``topk`` + ``sort`` keep and the
attention's extra outputs), on seeded random inputs: row by row as the official code runs one image, and per row in
ragged batches (padding never scored, counted or kept)."""

from __future__ import annotations

import pytest
import torch

from flowcut_reference import layer_with_signals, official_prune_count, official_score
from vtprune.strategies.functional.flowcut import (
    flowcut_accumulate,
    flowcut_keep,
    flowcut_layer_terms,
    flowcut_prune_counts,
    flowcut_prunes_at,
    flowcut_remaining,
    flowcut_scores,
)
from vtprune.testing.models import tiny_clip_config


def _peaked_rows(lengths, width, seed, temperature=0.2):
    """A ragged batch of softmax rows (B, width) over each row's first ``lengths[b]`` entries, 0 beyond, and its mask."""
    generator = torch.Generator().manual_seed(seed)
    valid = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]  # (B, n)
    logits = torch.randn(len(lengths), width, generator=generator) / temperature
    rows = logits.masked_fill(~valid, float("-inf")).softmax(dim=-1)  # (B, n)
    return rows, valid


def test_the_schedule_is_every_second_layer_ending_before_the_feature_layer():
    layers = [n for n in range(24) if flowcut_prunes_at(flowcut_remaining(22, n))]  # LLaVA-1.5: 24 layers, -2
    assert layers == list(range(1, 22, 2))
    assert [n for n in range(9) if flowcut_prunes_at(flowcut_remaining(7, n))] == [0, 2, 4, 6]
    assert not flowcut_prunes_at(-2)  # past the feature layer nothing prunes


@pytest.mark.parametrize("seed", range(4))
def test_scores_are_the_official_compute_score(seed):
    generator = torch.Generator().manual_seed(seed)
    relation = torch.rand(3, 20, generator=generator)
    semantic = torch.rand(3, 20, generator=generator)
    value = torch.randn(3, 20, 8, generator=generator)
    assert torch.equal(flowcut_scores(relation, semantic, value), official_score(relation, semantic, value))


def test_running_score_blends_half_and_half():
    first = torch.tensor([[1.0, 2.0]])
    assert torch.equal(flowcut_accumulate(None, first), first)
    assert torch.equal(flowcut_accumulate(first, torch.tensor([[3.0, 0.0]])), torch.tensor([[2.0, 1.0]]))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("remaining", [1, 2, 4, 20])
def test_prune_counts_are_the_official_count_of_each_row_alone(seed, remaining):
    lengths = [30, 17, 24]
    rows, valid = _peaked_rows(lengths, 30, seed)
    ours = flowcut_prune_counts(rows, valid, remaining, keep_patches=8)
    for b, n in enumerate(lengths):
        assert int(ours[b]) == official_prune_count(rows[b : b + 1, :n], remaining, 8)
    assert flowcut_prune_counts(rows, valid, 0, 8).tolist() == lengths  # rpl 0: every present patch asked


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("remaining", [1, 2, 4, 20])
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_shared_counts_are_the_official_batch_count(seed, remaining, batch):
    """``shared=True`` on an equal-length batch: every row asks the official batched ``adaptive_prune_ratio``
    (``r.max(0)`` before ``round``); one row: its own count."""
    rows, valid = _peaked_rows([30] * batch, 30, seed)
    shared = flowcut_prune_counts(rows, valid, remaining, keep_patches=8, shared=True)
    assert shared.tolist() == [official_prune_count(rows, remaining, 8)] * batch
    own = flowcut_prune_counts(rows, valid, remaining, keep_patches=8)
    assert int(shared[0]) == int(own.max())  # round is monotone: the largest rounded count
    assert flowcut_prune_counts(rows, valid, 0, 8, shared=True).tolist() == [30] * batch


def test_the_shared_count_skips_rows_at_the_target():
    """A ragged batch (not an official case: there ``shared`` rows never differ in length): the rows above the target
    share the official count of their own batch; a row at the target takes no part in the max and asks 0."""
    rows, valid = _peaked_rows([12, 12, 1], 12, seed=3)
    own = flowcut_prune_counts(rows, valid, 2, keep_patches=1)
    shared = flowcut_prune_counts(rows, valid, 2, keep_patches=1, shared=True)
    assert shared.tolist() == [int(own[:2].max())] * 2 + [0]
    assert shared[0] == official_prune_count(rows[:2, :12], 2, 1)


def test_a_flat_cls_attention_prunes_nothing_and_a_peaked_one_prunes():
    valid = torch.ones(2, 40, dtype=torch.bool)
    flat = torch.full((1, 40), 1 / 40)
    peaked = torch.zeros(1, 40).index_fill_(1, torch.tensor([3]), 1.0).add_(1e-6)
    counts = flowcut_prune_counts(torch.cat([flat, peaked]), valid, 4, keep_patches=10)
    assert counts[0] == 0 and counts[1] > 10


@pytest.mark.parametrize("seed", range(6))
def test_keep_is_the_official_topk_then_sort_per_row(seed):
    lengths = [30, 17, 24]
    generator = torch.Generator().manual_seed(seed)
    running = torch.rand(3, 30, generator=generator)
    valid = torch.arange(30)[None, :] < torch.tensor(lengths)[:, None]
    prune = torch.tensor([9, 2, 20])
    index, kept = flowcut_keep(running, valid, prune, keep_patches=6)
    for b, n in enumerate(lengths):
        target_num = max(n + 1 - int(prune[b]), 6 + 1)  # official, CLS counted
        official = torch.topk(running[b : b + 1, :n], target_num - 1, dim=1).indices.sort(dim=1).values[0]
        assert torch.equal(index[b][kept[b]], official)
        assert not bool(index[b][~kept[b]].any())  # padding slots point at 0
    assert kept.sum(1).tolist() == [21, 15, 6]


@pytest.mark.parametrize("seed", range(3))
def test_layer_terms_are_the_official_attentions_extra_outputs(seed):
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    torch.manual_seed(seed)
    config = tiny_clip_config()
    layer = CLIPEncoderLayer(config).eval()
    hidden = torch.randn(2, 17, config.hidden_size)  # (B, 1 + 16, D)
    heads = config.num_attention_heads
    with torch.no_grad():
        _, weights, semantic, values = layer_with_signals(layer, hidden, heads)
        x = layer.layer_norm1(hidden)
        attention = layer.self_attn
        relation, ours_semantic, value = flowcut_layer_terms(
            attention.q_proj(x), attention.k_proj(x), attention.v_proj(x), heads, attention.scale
        )
    torch.testing.assert_close(relation, weights[:, :, 0, 1:].mean(dim=1), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(ours_semantic, semantic.mean(1)[:, 1:], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(value, values.mean(1)[:, 1:], atol=0, rtol=0)


def test_layer_terms_of_a_padded_row_equal_the_row_alone():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 16, generator=generator) for _ in range(3))
    present = torch.ones(2, 9, dtype=torch.bool)
    present[1, 6:] = False  # row 1: CLS + 5 patches, 3 padding slots
    relation, semantic, value = flowcut_layer_terms(q, k, v, 4, 0.5, present)
    alone = flowcut_layer_terms(q[1:, :6], k[1:, :6], v[1:, :6], 4, 0.5)
    torch.testing.assert_close(relation[1, :5], alone[0][0], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(semantic[1, :5], alone[1][0], atol=1e-7, rtol=1e-6)
    assert not bool(relation[1, 5:].any()) and not bool(semantic[1, 5:].any())


def test_a_row_already_at_the_target_asks_nothing_in_a_ragged_batch():
    """Budget 1: a row pruned to its one patch while a batch-mate is still above (officially that row alone is not
    scored; here it asks 0, never a NaN count from log(1) = 0)."""
    rows, valid = _peaked_rows([12, 1], 12, seed=0)
    counts = flowcut_prune_counts(rows, valid, 2, keep_patches=1)
    assert counts[1] == 0 and counts[0] == official_prune_count(rows[:1], 2, 1)
    index, kept = flowcut_keep(torch.rand(2, 12), valid, counts, keep_patches=1)
    assert kept[1].sum() == 1 and index[1, 0] == 0
