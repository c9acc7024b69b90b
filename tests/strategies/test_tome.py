"""ToMe (facebookresearch/ToMe @ af95e4b1, tome/merge.py) against an independent re-implementation of the official
closures, on seeded inputs with near ties, a class token, odd and even token counts, and rows batch == alone."""

from __future__ import annotations

import math

import pytest
import torch

from vtprune.strategies.functional.tome import (
    bipartite_matching,
    merge_slots,
    merge_tokens,
    merge_wavg,
    parse_r,
    tome_reduce,
)


def official_matching(metric, r, class_token=False):
    """The official bipartite_soft_matching, written out: returns merge(x, mode)."""
    protected = 1 if class_token else 0
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return lambda x, mode="mean": x
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def official_wavg(merge, x, size=None):
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def official_source(merge, x, source=None):
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t, device=x.device)[None, ...].expand(n, t, t)
    return merge(source, mode="amax")


def near_ties(batch, tokens, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, tokens // 3 + 1, dim, generator=generator)
    x = base.repeat_interleave(3, dim=1)[:, :tokens]  # groups of three near-identical tokens
    return x + 1e-6 * torch.randn(batch, tokens, dim, generator=generator)


@pytest.mark.parametrize("tokens", [9, 10, 17])
@pytest.mark.parametrize("class_token", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_matching_merge_wavg_and_source_equal_official(tokens, class_token, seed):
    x = near_ties(3, tokens, 6, seed)
    metric = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 7))
    size, source, slots = None, None, torch.arange(tokens).expand(3, -1)
    ours, ref = x.clone(), x.clone()
    our_size = None
    for layer, r in enumerate([3, 2, 5]):
        merge = official_matching(metric, r, class_token)
        matching = bipartite_matching(metric, r, class_token)
        source = official_source(merge, ref, source)
        ref, size = official_wavg(merge, ref, size)
        ours, our_size = merge_wavg(ours, matching, our_size)
        slots = merge_slots(slots, matching)
        metric = merge(metric, mode="mean")
        torch.testing.assert_close(ours, ref, atol=0, rtol=0)
        assert torch.equal(our_size, size)
        assert torch.equal(slots, source.argmax(dim=1))  # each original token's group
        assert torch.equal(source.sum(dim=-1, keepdim=True), size)
    if class_token:
        assert bool((slots[:, 0] == 0).all()) and bool((size[:, 0, 0] == 1).all())  # class token untouched, first


def test_r_clamps_to_half_and_zero_is_identity():
    x = torch.randn(2, 7, 4)
    assert bipartite_matching(x, 100).r == 3
    assert bipartite_matching(x, 100, class_token=True).r == 3
    matching = bipartite_matching(x, 0)
    assert matching.r == 0 and torch.equal(merge_tokens(x, matching), x)


def test_parse_r_matches_official_schedules():
    assert parse_r(4, 8) == [8, 8, 8, 8]
    assert parse_r(5, (8, -1.0)) == [16, 12, 8, 4, 0]
    assert parse_r(3, [5]) == [5, 0, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tome_reduce_ragged_rows_equal_rows_alone(seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = [13, 7, 1]
    x = torch.randn(3, 13, 5, generator=generator)
    valid = torch.arange(13)[None] < torch.tensor(lengths)[:, None]
    counts = torch.tensor([4, 6, 1])
    keep, values, assignment = tome_reduce(x, counts, valid=valid)
    for row, n in enumerate(lengths):
        k, v, a = tome_reduce(x[row : row + 1, :n], int(counts[row]))
        assert torch.equal(keep[row, :n], k[0]) and not bool(keep[row, n:].any())
        assert torch.equal(values[row, :n][k[0]], v[0][k[0]])
        assert torch.equal(assignment[row, :n], a[0]) and bool((assignment[row, n:] == -1).all())
        assert int(keep[row].sum()) == min(int(counts[row]), n)
        # each kept value is the plain mean of the tokens assigned to it (size-weighted averages compose)
        for position in keep[row].nonzero().flatten():
            group = x[row, :n][assignment[row, :n] == position]
            torch.testing.assert_close(values[row, position], group.mean(0), atol=1e-5, rtol=1e-5)


def test_tower_schedule_official_r_and_derived_from_the_budget():
    from vtprune.adapters.tower_merge import merge_schedule

    assert merge_schedule(577, 1, 23, r=8) == [8] * 23  # official constant r (budget as a floor only)
    assert merge_schedule(17, 12, 4, r=2) == [2, 2, 0, 0]  # stops at the budget (16 - 12 = 4 patches removed)
    derived = merge_schedule(577, 64, 23)
    assert sum(derived) == 512 and max(derived) - min(derived) <= 1
    assert merge_schedule(17, 2, 1) == [14]  # one layer: several rounds remove more than half
    assert merge_schedule(17, 16, 3) == [0, 0, 0]


@pytest.mark.parametrize("seed", [0, 1])
def test_tome_reduce_merges_its_own_metric_once_with_the_same_result(seed):
    """The tokens as their own metric are merged once per round (the speed path): the result is bit for bit the
    one with the same values given as a separate metric tensor (merged on its own), full rows and ragged rows."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 40, 6, generator=generator)
    for valid in (None, torch.rand(3, 40, generator=generator) > 0.3):
        counts = torch.tensor([5, 11, 2])
        own = tome_reduce(x, counts, valid=valid)
        separate = tome_reduce(x, counts, metric=x.clone(), valid=valid)
        assert all(torch.equal(a, b) for a, b in zip(own, separate))


def test_merge_wavg_without_sizes_equals_unit_sizes():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 11, 4, generator=generator)
    matching = bipartite_matching(torch.randn(2, 11, 3, generator=generator), 4, class_token=True)
    merged, size = merge_wavg(x, matching)
    ones, unit = merge_wavg(x, matching, torch.ones(2, 11, 1))
    assert torch.equal(merged, ones) and torch.equal(size, unit)


def test_tower_merge_step_is_batched_no_loop_over_rows_or_tokens():
    """The in-tower step dispatches the same ops whatever the batch (images / crops) and token count: one matching
    per round for the whole batch, no Python loop over rows or tokens (benchmarks/_opcount.py counts the ops)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from _opcount import count_ops

    from vtprune.strategies.functional.tome import tower_merge_step

    totals = set()
    for batch, tokens in ((1, 33), (6, 33), (1, 129), (5, 129)):
        generator = torch.Generator().manual_seed(batch)
        hidden = torch.randn(batch, tokens, 8, generator=generator)
        keys = torch.randn(batch, tokens, 4 * 3, generator=generator)
        (merged, size, slots, done), counter = count_ops(lambda: tower_merge_step(hidden, keys, 4, 7, None, None))
        assert done == 7 and merged.shape == (batch, tokens - 7, 8) and int(size.sum()) == batch * tokens
        assert slots.shape == (batch, tokens) and int(slots.max()) == tokens - 8
        totals.add(counter.total)
    assert len(totals) == 1
