"""MustDrop's rules (strategies/functional/mustdrop.py) against an independent re-implementation of the official
functions (liuting20/MustDrop @ 909afa53), written here from the official code, batch of one as it runs:

* ``local_merge.py`` ``conditional_pooling`` + ``merge_wavg`` (unit sizes), on a CLS + square grid;
* ``clip_encoder.py`` key set: ``topk(cls_attn.mean(heads), ceil(0.08 * (N - 1)))``;
* ``modelling_sparse_llama.py`` ``dual_attention_filter`` on a full (1, H, L, L) attention map.

Then the stages: the selection contract (`check_stage`), ragged batches == rows alone, the critical set = the
official kept set.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vtprune.framework import Signals, build_registry, compose
from vtprune.strategies.functional.mustdrop import (
    PASS_TIER,
    cls_key_set,
    dual_attention_keep,
    dual_scores,
    local_merge,
    local_merge_to_count,
    window_similarity,
    window_positions,
)
from vtprune.strategies.mustdrop import MustDropBudget, MustDropDual, MustDropFill, MustDropMerge
from vtprune.testing import check_stage, registry_cases

REGISTRY = build_registry(autoload=False)


# ---------------------------------------------------------------------------------------------------------------
# The official functions, re-implemented (batch of one; ``einops.rearrange`` written as reshape / permute)
# ---------------------------------------------------------------------------------------------------------------


def official_conditional_pooling(feat: torch.Tensor, threshold: float, ws: int):
    """(merged sequence [CLS, dst (topk order), unm (ascending)], dst positions, unm positions) of one image."""
    x_cls, patches = feat[:, :1], feat[:, 1:]
    b, n, c = patches.shape
    side = int(math.sqrt(n))
    assert side * side == n and side % ws == 0
    grid = patches.reshape(b, side, side, c).permute(0, 3, 1, 2)  # b c h w
    gh = side // ws
    win = grid.reshape(b, c, gh, ws, gh, ws).permute(0, 2, 4, 1, 3, 5)  # b gh gw c ps_h ps_w
    flat = win.reshape(b, gh, gh, c, -1)
    sims = F.cosine_similarity(flat.unsqueeze(-1), flat.unsqueeze(-2), dim=3)
    sims = sims * (1 - torch.eye(ws * ws))
    similarity = (sims.sum(-1).sum(-1) / ((ws * ws) * (ws * ws - 1))).reshape(b, -1)
    r = int(torch.ge(similarity, torch.tensor(threshold).repeat(1, similarity.shape[1])).sum(dim=1).min())
    _, top = similarity.topk(r, dim=-1)
    index = torch.arange(n).reshape(side, side).unsqueeze(0)
    windows = index.unfold(1, ws, ws).unfold(2, ws, ws).reshape(b, -1, ws * ws)
    gathered = torch.gather(windows, 1, top.unsqueeze(-1).expand(-1, -1, ws * ws))
    mask = torch.ones(b, windows.shape[1], dtype=torch.bool)
    mask.scatter_(1, top, torch.zeros_like(top, dtype=torch.bool))
    unm_idx = windows[mask.unsqueeze(-1).expand(-1, -1, ws * ws)].reshape(b, -1).sort(dim=-1).values.unsqueeze(-1)
    last = ws * ws - 1
    src_idx = gathered[:, :, :last].reshape(b, -1).unsqueeze(-1)
    dst_idx = gathered[:, :, last].reshape(b, -1).unsqueeze(-1)
    merge_idx = torch.arange(r).repeat_interleave(last).repeat(b, 1).unsqueeze(-1)

    def merge(x, mode):
        xc, xf = x[:, :1], x[:, 1:]
        nn_, t1, cc = xf.shape
        src = xf.gather(-2, src_idx.expand(nn_, r * last, cc))
        dst = xf.gather(-2, dst_idx.expand(nn_, r, cc))
        unm = xf.gather(-2, unm_idx.expand(nn_, t1 - r * ws * ws, cc))
        dst = dst.scatter_reduce(-2, merge_idx.expand(nn_, r * last, cc), src, reduce=mode)
        return torch.cat((xc, torch.cat([dst, unm], dim=1)), dim=1)

    size = torch.ones_like(feat[..., 0, None])
    merged = merge(feat * size, "sum") / merge(size, "sum")  # merge_wavg
    return merged, dst_idx.flatten(), unm_idx.flatten()


def official_key_set(cls_attn_map: torch.Tensor, keep_rate: float = 0.08) -> torch.Tensor:
    """``attn`` (1, H, N, N) of CLIP's last layer, CLS first: indices (into the patches) of the key set."""
    n = cls_attn_map.shape[-1]
    left = math.ceil(keep_rate * (n - 1))
    _, index = torch.topk(cls_attn_map[:, :, 0, 1:].mean(dim=1), left, dim=1, largest=True)
    return index[0]


def official_dual_attention_filter(attn, v_token_start, img_seq, global_thr, individual_thr):
    _, _, total_seq, _ = attn.shape
    attn = attn[0]
    text_seq = total_seq - img_seq - v_token_start
    attn = attn.narrow(1, v_token_start + img_seq, text_seq).narrow(2, v_token_start, img_seq)
    attn = attn.mean(dim=0)
    attn_sum = attn.sum(dim=0)
    candidate = (attn_sum < attn_sum.sum(dim=0) * global_thr) & (attn.max(dim=0)[0] < individual_thr)
    return torch.arange(img_seq)[~candidate]


# ---------------------------------------------------------------------------------------------------------------
# Inputs with near ties
# ---------------------------------------------------------------------------------------------------------------


def _grid_tokens(side: int, dim: int, seed: int, similar: int = 3) -> torch.Tensor:
    """(side*side, dim) tokens whose first ``similar`` 3x3 windows (row-major) are near-constant (similarity
    close to 1, two of them equal up to float noise) and the rest random."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(side * side, dim, generator=gen)
    windows = window_positions(side, side, 3)
    base = torch.randn(dim, generator=gen)
    for w in range(min(similar, windows.shape[0])):
        noise = 0.05 if w < 2 else 0.2
        tokens[windows[w]] = base + noise * torch.randn(9, dim, generator=gen)
    return tokens


def _official_merge(tokens: torch.Tensor, threshold: float):
    """kept position -> value, with the official code (CLS prepended as a zero token)."""
    feat = torch.cat([torch.zeros(1, tokens.shape[1]), tokens]).unsqueeze(0)
    merged, dst, unm = official_conditional_pooling(feat, threshold, 3)
    order = torch.cat([dst, unm])
    return {int(p): merged[0, 1 + i] for i, p in enumerate(order.tolist())}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("side", [6, 9])
def test_local_merge_equals_official(seed: int, side: int) -> None:
    tokens = _grid_tokens(side, 16, seed)
    sims = window_similarity(tokens, window_positions(side, side, 3))
    # thresholds at a window's similarity exactly (">=" keeps it merged), between, and above every window
    for threshold in [float(sims[1]), float(sims[2]), float(sims.max()) + 1e-3, -1.0, 0.8]:
        want = _official_merge(tokens, threshold)
        got = local_merge(tokens.unsqueeze(0), [(side, side)], torch.ones(1, side * side, dtype=torch.bool), threshold)
        kept = got.keep[0].nonzero().flatten().tolist()
        assert kept == sorted(want), threshold
        for position in kept:
            torch.testing.assert_close(got.values[0, position], want[position], atol=1e-6, rtol=0)
        # assignment: every token to the kept position standing for it, sizes n at merged windows
        sizes = torch.bincount(got.assignment[0], minlength=side * side)
        assert int(sizes.sum()) == side * side and set(sizes.nonzero().flatten().tolist()) == set(kept)


def test_window_similarity_near_tie_order_is_stable() -> None:
    tokens = _grid_tokens(6, 8, 0, similar=0)
    windows = window_positions(6, 6, 3)
    tokens[windows[3]] = tokens[windows[0]]  # windows 0 and 3 tie exactly
    sims = window_similarity(tokens, windows)
    assert float(sims[0]) == float(sims[3])
    # merging one window's worth goes to the lower window index
    out = local_merge_to_count(tokens.unsqueeze(0), [(6, 6)], torch.tensor([36 - 8]), torch.ones(1, 36, dtype=torch.bool))
    top = int(torch.sort(sims, descending=True, stable=True).indices[0])
    assert not bool(out.keep[0, windows[top, :8]].any()) and bool(out.keep[0, windows[top, 8]])


@pytest.mark.parametrize("seed", [0, 3])
def test_merge_to_count_reproduces_the_threshold_rule(seed: int) -> None:
    tokens = _grid_tokens(9, 12, seed, similar=4)
    valid = torch.ones(1, 81, dtype=torch.bool)
    adaptive = local_merge(tokens.unsqueeze(0), [(9, 9)], valid, 0.8)
    count = int(adaptive.keep.sum())
    exact = local_merge_to_count(tokens.unsqueeze(0), [(9, 9)], torch.tensor([count]), valid)
    assert torch.equal(exact.keep, adaptive.keep) and torch.equal(exact.assignment, adaptive.assignment)
    torch.testing.assert_close(exact.values, adaptive.values, atol=0, rtol=0)


def test_merge_ragged_batch_equals_rows_alone() -> None:
    rows = [_grid_tokens(6, 8, 1), _grid_tokens(9, 8, 2), _grid_tokens(3, 8, 3)]
    grids = [(6, 6), (9, 9), (3, 3)]
    width = max(r.shape[0] for r in rows)
    visual = torch.zeros(3, width, 8)
    valid = torch.zeros(3, width, dtype=torch.bool)
    for b, r in enumerate(rows):
        visual[b, : r.shape[0]] = r
        valid[b, : r.shape[0]] = True
    counts = torch.tensor([20, 50, 2])
    batch = local_merge_to_count(visual, grids, counts, valid)
    adaptive = local_merge(visual, grids, valid, 0.8)
    for b, r in enumerate(rows):
        n = r.shape[0]
        one = torch.ones(1, n, dtype=torch.bool)
        alone = local_merge_to_count(r.unsqueeze(0), [grids[b]], counts[b : b + 1], one)
        assert torch.equal(batch.keep[b, :n], alone.keep[0]) and not bool(batch.keep[b, n:].any())
        assert torch.equal(batch.assignment[b, :n], alone.assignment[0])
        assert bool((batch.assignment[b, n:] == -1).all())
        torch.testing.assert_close(batch.values[b, :n], alone.values[0], atol=0, rtol=0)
        assert int(batch.keep[b].sum()) == int(counts[b])
        adaptive_alone = local_merge(r.unsqueeze(0), [grids[b]], one, 0.8)
        assert torch.equal(adaptive.keep[b, :n], adaptive_alone.keep[0])


def test_merge_counts_below_the_windows_cut_by_size() -> None:
    tokens = _grid_tokens(6, 8, 4)
    out = local_merge_to_count(tokens.unsqueeze(0), [(6, 6)], torch.tensor([2]), torch.ones(1, 36, dtype=torch.bool))
    assert int(out.keep.sum()) == 2
    kept = out.keep[0].nonzero().flatten()
    sizes = torch.bincount(out.assignment[0].clamp(min=0), minlength=36)
    assert bool((sizes[kept] == 9).all())  # the two kept tokens are merged windows (size 9)
    assert int((out.assignment[0] == -1).sum()) == 36 - 18


# ---------------------------------------------------------------------------------------------------------------
# Dual-attention filter and key set
# ---------------------------------------------------------------------------------------------------------------


def _attention_map(length: int, heads: int, seed: int, causal: bool = True) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, heads, length, length, generator=gen) * 3
    allowed = torch.ones(length, length, dtype=torch.bool).tril() if causal else torch.ones(length, length, dtype=torch.bool)
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_dual_attention_filter_equals_official(seed: int) -> None:
    start, img, text, heads = 5, 24, 7, 4
    attn = _attention_map(start + img + text, heads, seed)
    rows = attn[:, :, start + img :, start : start + img]  # (1, H, T, N)
    head_mean = rows[0].mean(0)
    global_share = head_mean.sum(0) / head_mean.sum()
    peaks = head_mean.max(0).values
    # near ties: thresholds at a token's exact global share / peak (">=" keeps it), plus the official configs
    configs = [(float(global_share.sort().values[12]), float(peaks.sort().values[10])), (0.011, 0.01), (0.0012, 0.001),
               (0.005, 0.001), (1.0, 0.0), (1.0, float(peaks.max()) + 1)]
    for g, i in configs:
        want = official_dual_attention_filter(attn, start, img, g, i)
        got = dual_attention_keep(rows, torch.ones(1, img, dtype=torch.bool), g, i)
        assert got[0].nonzero().flatten().tolist() == want.tolist(), (g, i)


def test_dual_filter_and_key_set_ragged_batch_equals_rows_alone() -> None:
    lengths = [24, 9, 16]
    width = max(lengths)
    attention = torch.zeros(3, 4, 3, width)
    cls = torch.zeros(3, 4, width)
    valid = torch.zeros(3, width, dtype=torch.bool)
    gen = torch.Generator().manual_seed(7)
    for b, n in enumerate(lengths):
        attention[b, :, :, :n] = torch.softmax(torch.randn(4, 3, n + 5, generator=gen), -1)[..., :n]
        cls[b, :, :n] = torch.rand(4, n, generator=gen)
        valid[b, :n] = True
    scores = dual_scores(attention, cls, valid, 0.03, 0.05, 0.08)
    for b, n in enumerate(lengths):
        alone = dual_scores(attention[b : b + 1, :, :, :n], cls[b : b + 1, :, :n], torch.ones(1, n, dtype=torch.bool), 0.03, 0.05, 0.08)
        torch.testing.assert_close(scores[b, :n], alone[0], atol=0, rtol=0)
        passed = set((alone[0] >= PASS_TIER).nonzero().flatten().tolist())
        want = set(dual_attention_keep(attention[b : b + 1, :, :, :n], torch.ones(1, n, dtype=torch.bool), 0.03, 0.05)[0].nonzero().flatten().tolist())
        want |= set(cls_key_set(cls[b : b + 1, :, :n], torch.ones(1, n, dtype=torch.bool), 0.08)[0].nonzero().flatten().tolist())
        assert passed == want


@pytest.mark.parametrize("seed", [0, 1])
def test_key_set_equals_official(seed: int) -> None:
    attn = _attention_map(577, 4, seed, causal=False)  # CLIP-L/336: CLS + 576 patches (bidirectional)
    want = official_key_set(attn)
    assert want.numel() == 47  # ceil(0.08 * 576)
    got = cls_key_set(attn[:, :, 0, 1:], torch.ones(1, 576, dtype=torch.bool), 0.08)
    assert sorted(got[0].nonzero().flatten().tolist()) == sorted(want.tolist())


# ---------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [MustDropDual, MustDropFill, MustDropMerge])
def test_stage_contract(stage) -> None:
    check_stage(stage, registry=REGISTRY)


def test_adaptive_split_gets_the_relaxed_contract() -> None:
    """``mustdrop_split`` keeps the official count (below the budget): the kit no longer skips it, and the preset, but
    runs the relaxed contract (count at most the budget; batch == alone, padding, determinism, keep-all as for every
    stage); its exact rule is `test_mustdrop_keeps_the_official_adaptive_count`."""
    assert MustDropBudget.adaptive_counts is True
    ids = {p.id: p.marks for p in registry_cases(REGISTRY, kinds=("preset", "budget"))}
    for case in ("preset.mustdrop", "budget.mustdrop_split"):
        assert not ids[case], case
    check_stage("budget", "mustdrop_split", registry=REGISTRY, shapes=((9, 6), (1, 7, 20)), seeds=(0,))


def _official_prefill_keep(attention: torch.Tensor, cls: torch.Tensor, n: int, global_thr: float, individual_thr: float,
                           keep_rate: float) -> list[int]:
    """The official prefill kept set of one row (ascending positions): ``dual_attention_filter`` on the text rows,
    united with the key set (``topk`` of the head-mean CLS attention, ``ceil(keep_rate * n)``), written plainly."""
    heads = attention.shape[0]
    start = 2
    length = start + n + 1
    full = torch.zeros(1, heads, length, length)
    full[0, :, start + n, start : start + n] = attention  # the one text row after the image
    kept = set(official_dual_attention_filter(full, start, n, global_thr, individual_thr).tolist())
    left = math.ceil(keep_rate * n)
    if left:
        kept |= set(torch.topk(cls.mean(dim=0), left).indices.tolist())
    return sorted(kept)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mustdrop_keeps_the_official_adaptive_count(seed: int) -> None:
    """Through `Pipeline.select`: each row keeps exactly the official kept set (its size is the adaptive count),
    all critical, when the budget is at or above it; a lower budget caps it (the highest global shares of the set);
    a ragged batch equals its rows alone."""
    pipeline = compose("mustdrop", global_thr=0.05, individual_thr=0.2, keep_rate=0.08, registry=REGISTRY)
    gen = torch.Generator().manual_seed(seed)
    lengths = [30, 17, 24]
    width = max(lengths)
    attention = torch.zeros(3, 4, width)
    cls = torch.zeros(3, 4, width)
    valid = torch.zeros(3, width, dtype=torch.bool)
    for b, n in enumerate(lengths):
        attention[b, :, :n] = torch.softmax(torch.randn(4, n + 6, generator=gen) * 2, -1)[:, :n]
        cls[b, :, :n] = torch.rand(4, n, generator=gen)
        valid[b, :n] = True
    signals = Signals(visual=torch.randn(3, width, 8, generator=gen), visual_mask=valid, attention=attention,
                      cls_attention=cls, prompt=torch.randn(3, 3, 8, generator=gen))
    official = [_official_prefill_keep(attention[b, :, :n], cls[b, :, :n], n, 0.05, 0.2, 0.08) for b, n in enumerate(lengths)]
    counts = [len(o) for o in official]
    assert all(0 < c < n for c, n in zip(counts, lengths)), counts  # the thresholds split every row
    # a budget below every row's tokens and at or above the official count leaves the count to the data
    for budget in (max(counts), min(lengths) - 1, 0.5):
        if isinstance(budget, float) and any(round(budget * n) < c for n, c in zip(lengths, counts)):
            continue
        selection = pipeline.select(signals, budget)
        assert selection.counts.tolist() == counts, budget
        for b in range(3):
            assert selection.row_indices(b).tolist() == official[b]
            assert bool(selection.critical[b][selection.mask[b]].all())
    # a budget resolving to every real token keeps every token (keep-all reproduces the unpruned model)
    for budget in (1.0, width):
        assert pipeline.select(signals, budget).counts.tolist() == lengths
    cap = min(counts) - 1
    capped = pipeline.select(signals, cap)
    assert capped.counts.tolist() == [cap] * 3
    for b, n in enumerate(lengths):
        share = attention[b, :, :n].mean(0)  # the global share orders the passed set (one text row)
        want = sorted(sorted(official[b], key=lambda i: (-float(share[i]), i))[:cap])
        assert capped.row_indices(b).tolist() == want
        alone = pipeline.select(Signals(visual=signals.visual[b : b + 1, :n], attention=attention[b : b + 1, :, :n],
                                        cls_attention=cls[b : b + 1, :, :n], prompt=signals.prompt[b : b + 1]), n - 1)
        assert alone.row_indices(0).tolist() == official[b]


def test_mustdrop_split_without_scores_keeps_the_budget() -> None:
    pipeline = compose("relevance.none+critical+diversity.mustdrop_fill+budget.mustdrop_split+layer(k=3)", registry=REGISTRY)
    signals = Signals(visual=torch.randn(2, 12, 8), attention=torch.rand(2, 4, 12))
    selection = pipeline.select(signals, 5)
    assert selection.counts.tolist() == [5, 5] and not bool(selection.critical.any())
