"""PruMerge / PruMerge+ maths (`vtprune.strategies.functional.prumerge`) against the loop-style official reference
(tests/helpers/prumerge_reference.py): kept positions and their official order, merged values and the extra token,
bit for bit on seeded inputs (random, tied attention, duplicated keys), ragged batches with different adaptive
counts (batch == alone), the count quirks, the cap and the stages / preset wiring.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prumerge_reference import official_outlier_ratio, official_prumerge
from vtprune import framework
from vtprune.framework.signals import Signals
from vtprune.strategies.functional.prumerge import iqr_outlier_count, prumerge_order, prumerge_row, prumerge_select

SEEDS = range(6)


def _inputs(seed: int, n: int, dim: int = 12, kdim: int = 10, ties: bool = False):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n + 1, generator=gen)  # CLS + patches
    spikes = torch.rand(n + 1, generator=gen) < 0.06
    logits = logits + 4.0 * spikes  # a few tokens far above the rest: the IQR outliers of a real CLS row
    if ties:  # coarse grid: many equal attention values, so topk meets ties
        logits = (logits * 2).round() / 2
    attention = torch.softmax(logits, dim=0)[1:]  # (n,) CLS column removed, as the official row
    hidden = torch.randn(n, dim, generator=gen)
    keys = torch.randn(n, kdim, generator=gen)
    if ties:  # duplicated keys: equal cosine similarities for the neighbour topk
        keys[1::3] = keys[0::3][: keys[1::3].shape[0]]
    return hidden, keys, attention


def _check_against_official(hidden, keys, attention, plus):
    n = hidden.shape[0]
    sequence, official_order = official_prumerge(hidden.unsqueeze(0), attention.unsqueeze(0), keys.unsqueeze(0), plus)
    keep, values, order = prumerge_row(hidden, keys, attention, plus=plus)
    assert torch.equal(order, official_order)
    assert torch.equal(values[order], sequence[0, : order.numel()])
    kept_list = torch.zeros(n, dtype=torch.bool)
    kept_list[order] = True
    pruned = torch.nonzero(~kept_list).flatten()
    assert pruned.numel() > 0
    assert torch.equal(values[pruned[-1]], sequence[0, -1])  # the extra token, at the last pruned position
    expected = kept_list.clone()
    expected[pruned[-1]] = True
    assert torch.equal(keep, expected)
    others = ~keep
    assert torch.equal(values[others], hidden[others])  # dropped tokens untouched (never read)
    return order.numel()


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_row_matches_official(seed, ties, plus):
    n = (40, 64, 97, 144, 200, 576)[seed]
    hidden, keys, attention = _inputs(seed, n, ties=ties)
    if official_outlier_ratio(attention.unsqueeze(0)) == 0:
        pytest.skip("no outliers for this draw")  # never for these seeds (checked below)
    _check_against_official(hidden, keys, attention, plus)


def test_seeds_have_outliers():
    for seed in SEEDS:
        for ties in (False, True):
            n = (40, 64, 97, 144, 200, 576)[seed]
            assert official_outlier_ratio(_inputs(seed, n, ties=ties)[2].unsqueeze(0)) > 0


def test_outlier_count_matches_numpy_percentiles():
    for seed in range(200):
        gen = torch.Generator().manual_seed(seed)
        n = int(torch.randint(4, 700, (1,), generator=gen))
        row = torch.softmax(torch.randn(n, generator=gen) * 3, dim=0) if seed % 2 else torch.rand(n, generator=gen) ** 6
        assert iqr_outlier_count(row) == round(official_outlier_ratio(row.unsqueeze(0)) * n)


def test_count_keeps_the_official_float_truncation():
    # int(n * (m / n)) is m - 1 for (m, n) = (8, 49): the official top-k keeps 7 of 8 outliers
    assert int(49 * (8 / 49)) == 7
    attention = torch.full((49,), 1e-3)
    attention[:8] = torch.linspace(0.5, 0.2, 8)
    assert iqr_outlier_count(attention) == 8
    order, k = prumerge_order(attention)
    assert k == 7 and torch.equal(order, torch.arange(7))


def test_plus_samples_are_uniform_and_not_duplicated():
    hidden, keys, attention = _inputs(3, 144)
    order, k = prumerge_order(attention, plus=True)
    m = iqr_outlier_count(attention)
    stride = int(int(144 / m) / 3)
    samples = torch.arange(0, 143, stride)
    assert torch.equal(order[:k], torch.topk(attention, k).indices)
    assert set(order[k:].tolist()) == set(samples.tolist()) - set(order[:k].tolist())
    assert order.unique().numel() == order.numel()
    assert torch.equal(order[k:], order[k:].sort().values)


def test_no_outliers_keeps_only_the_extra_token():
    hidden = torch.randn(16, 4)
    attention = torch.full((16,), 1 / 17)
    for plus in (False, True):
        keep, values, order = prumerge_row(hidden, torch.randn(16, 3), attention, plus=plus)
        assert order.numel() == 0 and keep.sum() == 1 and keep[-1]
        assert torch.allclose(values[-1], (hidden * attention[:, None]).sum(0))


@pytest.mark.parametrize("plus", [False, True])
def test_cap_keeps_the_head_of_the_official_list_and_the_extra_token(plus):
    hidden, keys, attention = _inputs(2, 97)
    _, _, full = prumerge_row(hidden, keys, attention, plus=plus)
    for cap in (1, 2, 5, full.numel(), full.numel() + 1, 96):
        keep, values, order = prumerge_row(hidden, keys, attention, cap=cap, plus=plus)
        assert int(keep.sum()) == min(cap, full.numel() + 1)
        assert torch.equal(order, full[: min(cap - 1, full.numel())])
        pruned = torch.nonzero(~torch.isin(torch.arange(97), order)).flatten()
        weights = attention[pruned][:, None]
        assert torch.allclose(values[pruned[-1]], (hidden[pruned] * weights).sum(0), atol=1e-6)


@pytest.mark.parametrize("plus", [False, True])
def test_ragged_batch_equals_rows_alone(plus):
    rows = [_inputs(s, n) for s, n in ((0, 50), (1, 81), (4, 64))]
    width = 81
    batch = len(rows)
    visual = torch.zeros(batch, width, 12)
    keys = torch.zeros(batch, width, 2, 5)  # two heads: concatenated back to the full width
    cls = torch.zeros(batch, 1, width)
    valid = torch.zeros(batch, width, dtype=torch.bool)
    for b, (h, k, a) in enumerate(rows):
        n = h.shape[0]
        visual[b, :n], keys[b, :n], cls[b, 0, :n], valid[b, :n] = h, k.view(n, 2, 5), a, True
    keep, values, _ = prumerge_select(visual, cls, keys, valid=valid, plus=plus)
    counts = keep.sum(dim=1)
    assert len(set(counts.tolist())) > 1  # the adaptive counts differ between the rows
    for b, (h, k, a) in enumerate(rows):
        n = h.shape[0]
        alone_keep, alone_values, _ = prumerge_row(h, k, a, plus=plus)
        assert torch.equal(keep[b, :n], alone_keep) and not keep[b, n:].any()
        assert torch.equal(values[b, :n][alone_keep], alone_values[alone_keep])
        _check_against_official(h, k, a, plus)


def _signals(seed: int, n: int = 64, batch: int = 2) -> Signals:
    rows = [_inputs(seed + b, n) for b in range(batch)]
    return Signals(
        visual=torch.stack([r[0] for r in rows]),
        visual_keys=torch.stack([r[1] for r in rows]).unsqueeze(2),
        cls_attention=torch.stack([r[2] for r in rows]).unsqueeze(1),
    )


@pytest.mark.parametrize("preset,plus", [("prumerge", False), ("prumerge_plus", True)])
def test_preset_selects_the_official_tokens_with_merged_values(preset, plus):
    pipeline = framework.compose(preset)
    signals = _signals(7)
    selection = pipeline.select(signals, 63)  # a cap above every official count: the official selection
    keep, values, _ = prumerge_select(signals.visual, signals.cls_attention, signals.visual_keys, plus=plus)
    assert torch.equal(selection.kept_mask(64), keep)
    gathered = selection.gather(signals.visual)  # (B, K, D)
    for b in range(2):
        assert torch.equal(gathered[b][selection.mask[b]], values[b][keep[b]])
    full = pipeline.select(signals, 64)  # keep-all: every token, its own value
    assert torch.equal(full.kept_mask(64), torch.ones(2, 64, dtype=torch.bool))
    assert full.values is None or torch.equal(full.gather(signals.visual), signals.visual)


def test_preset_budget_is_a_cap():
    pipeline = framework.compose("prumerge")
    signals = _signals(3)
    official = int(pipeline.select(signals, 63).counts.max())
    capped = pipeline.select(signals, official - 2)
    assert int(capped.counts.max()) == official - 2


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("cap", [63, 3])
def test_official_order_ranks_the_official_sequence(plus, cap):
    """``order=official``: `Selection.order` places the kept slots as the official output sequence (the kept list in its
    order, the extra token last), over the same kept set and values as the default; a cap keeps the list's head."""
    signals = _signals(11)
    default = framework.compose("prumerge_plus" if plus else "prumerge").select(signals, cap)
    ordered = framework.compose(
        f"relevance.none+critical+diversity.prumerge(plus={plus},order=official)+budget.prumerge+vision"
    ).select(signals, cap)
    assert default.order is None
    assert torch.equal(ordered.indices, default.indices) and torch.equal(ordered.values, default.values)
    for b in range(2):
        hidden, keys, attention = signals.visual[b], signals.visual_keys[b, :, 0], signals.cls_attention[b, 0]
        sequence, official_order = official_prumerge(hidden[None], attention[None], keys[None], plus)
        kept = ordered.row_indices(b)  # (k,) ascending
        emitted = kept[ordered.order[b][ordered.mask[b]].argsort()]  # (k,) in emission order
        head = official_order[: kept.numel() - 1]
        assert emitted[:-1].tolist() == head.tolist()
        values = ordered.values[b][ordered.mask[b]][ordered.order[b][ordered.mask[b]].argsort()]
        if cap == 63:  # the official count: the whole official sequence, extra token last
            torch.testing.assert_close(values, sequence[0], atol=0, rtol=0)


@pytest.mark.parametrize("plus", [False, True])
def test_merge_blocks_and_in_place_output_give_the_same_values(monkeypatch, plus):
    """The neighbour sums in blocks of any size (one centre, or all at once) and written into a given ``out`` are the
    same bits as the default call (each centre's sum is its own; ``out`` only saves a copy)."""
    import vtprune.strategies.functional.prumerge as module

    hidden, keys, attention = _inputs(3, 60, dim=16, kdim=12, ties=True)
    keep, values, order = prumerge_row(hidden, keys, attention, plus=plus)
    for size in (1, 10**12):
        monkeypatch.setattr(module, "MERGE_BLOCK_BYTES", size)
        other_keep, other_values, other_order = prumerge_row(hidden, keys, attention, plus=plus)
        assert torch.equal(other_keep, keep) and torch.equal(other_order, order) and torch.equal(other_values, values)
    out = hidden.clone()
    in_place = prumerge_row(hidden, keys, attention, plus=plus, out=out)
    assert in_place[1] is out and torch.equal(out, values) and torch.equal(in_place[0], keep)
