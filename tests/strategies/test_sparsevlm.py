"""SparseVLM against a plain loop-style re-implementation of the official functions (Gumpest/SparseVLMs @ b72c5d62:
``modelling_sparse_llama.py`` rater selection and recycling, ``score.py`` ``attn_postprocess_rank``, ``utils.py``
``cluster_and_merge`` without its random tie noise): seeded inputs, near ties, ragged batches, batch == alone."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from vtprune import framework
from vtprune.framework.errors import BudgetError
from vtprune.strategies.functional import sparsevlm as sv
from vtprune.testing import make_signals

REGISTRY = framework.build_registry(autoload=False)


# -- the reference: written out plainly, one row at a time ---------------------------------------------------------


def ref_raters(v: torch.Tensor, t: torch.Tensor) -> list[int]:
    """Official: m = softmax(v @ t^T, dim=2).mean(1); raters = where(m > m.mean())."""
    n, tl = v.shape[0], t.shape[0]
    m = [0.0] * tl
    for i in range(n):
        logits = [float(v[i].double() @ t[j].double()) for j in range(tl)]
        top = max(logits)
        exps = [math.exp(x - top) for x in logits]
        total = sum(exps)
        for j in range(tl):
            m[j] += exps[j] / total / n
    mean = sum(m) / tl
    out = [j for j in range(tl) if m[j] > mean]
    return out if out else list(range(tl))


def ref_rank_rule(attn: torch.Tensor, raters: list[int], scale: float, bias: float):
    """Official attn_postprocess_rank on (H, T, N) prompt rows: (kept mask, s_flag, scores)."""
    heads, _, n = attn.shape
    rows = torch.zeros(len(raters), n, dtype=torch.float64)
    for a, j in enumerate(raters):
        for c in range(n):
            rows[a, c] = sum(float(attn[h, j, c]) for h in range(heads)) / heads
    rank = int(torch.linalg.matrix_rank(rows.float()))
    scores = [float(rows[:, c].sum()) / len(raters) for c in range(n)]
    if n == rank:
        return [True] * n, False, scores
    k = min(int(rank * scale + bias), n - 1)
    order = sorted(range(n), key=lambda c: (-scores[c], c))
    keep = [False] * n
    for c in order[:k]:
        keep[c] = True
    return keep, True, scores


def ref_cluster_and_merge(x: torch.Tensor, k: int):
    """utils.py cluster_and_merge, loop by loop, without the 1e-6 random noise: (merged, centres, assignment)."""
    m, c = x.shape
    d = [[float((x[i].double() - x[j].double()).norm()) / math.sqrt(c) for j in range(m)] for i in range(m)]
    density = [math.exp(-sum(v * v for v in sorted(d[i])[:k]) / k) for i in range(m)]
    dmax = max(max(row) for row in d)
    parent = []
    for i in range(m):
        best = dmax
        for j in range(m):
            if density[j] > density[i]:
                best = min(best, d[i][j])
        parent.append(best)
    score = [parent[i] * density[i] for i in range(m)]
    centres = sorted(range(m), key=lambda i: (-score[i], i))[:k]
    assign = []
    for j in range(m):
        dists = [d[centre][j] for centre in centres]
        assign.append(dists.index(min(dists)))
    for a, centre in enumerate(centres):
        assign[centre] = a
    merged = torch.zeros(k, c, dtype=torch.float64)
    for a in range(k):
        members = [j for j in range(m) if assign[j] == a]
        merged[a] = sum(x[j].double() * (1.0 / (len(members) + 1e-6)) for j in members)  # weighted, then summed
    return merged, centres, assign


def ref_sparsevlm(visual, prompt, attn, scale, bias, inputs=None):
    """One row through the official sparse layer: (kept positions, {centre position: merged value}, assignment).
    ``inputs``: (visual, prompt) decoder input embeddings the raters are chosen from (official), else this point's."""
    raters = ref_raters(*(inputs if inputs is not None else (visual, prompt)))
    keep, flag, scores = ref_rank_rule(attn, raters, scale, bias)
    kept = [i for i, f in enumerate(keep) if f]
    if not flag:
        return kept, {}, {}
    deleted = [i for i, f in enumerate(keep) if not f]
    m = int(len(deleted) * 0.3) + 1
    chosen = sorted(deleted, key=lambda i: (-scores[i], i))[:m]
    clusters = int(m / 10) + 1
    merged, centres, assign = ref_cluster_and_merge(visual[chosen], clusters)
    values = {chosen[centres[a]]: merged[a] for a in range(clusters)}
    assignment = {chosen[j]: chosen[centres[assign[j]]] for j in range(len(chosen))}
    return kept, values, assignment


# -- tests ---------------------------------------------------------------------------------------------------------


def _signals(lengths, seed, prompt_len=7, dim=16, heads=3):
    return make_signals(lengths, dim=dim, prompt_len=prompt_len, seed=seed, heads=heads)


def _check_row(selection, signals, row, scale, bias):
    n = int(signals.valid()[row].sum())
    inputs = None
    if signals.input_visual is not None:
        m = int(signals.input_visual_mask[row].sum())
        inputs = (signals.input_visual[row, :m], signals.input_prompt[row])
    kept, values, assignment = ref_sparsevlm(
        signals.visual[row, :n], signals.prompt[row], signals.prompt_attention[row, :, :, :n], scale, bias, inputs
    )
    got = selection.row_indices(row).tolist()
    critical = selection.critical[row][selection.mask[row]]
    assert [i for i, c in zip(got, critical.tolist()) if c] == kept
    assert sorted(i for i, c in zip(got, critical.tolist()) if not c) == sorted(values)
    for slot, position in enumerate(got):
        if position in values:
            torch.testing.assert_close(selection.values[row, slot].double(), values[position], rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(selection.values[row, slot], signals.visual[row, position])
    for position, centre in assignment.items():
        assert got[int(selection.assignment[row, position])] == centre
    assert int(selection.sizes[row].sum()) == len(kept) + len(assignment)  # centres are among the recycled


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scale,bias", [(0.8, 0.0), (2.0, 1.0), (9.0, 6.0)])
def test_preset_matches_the_official_rules_on_ragged_rows(seed, scale, bias):
    signals = _signals([40, 23, 31], seed)
    pipeline = framework.compose("sparsevlm", scale=scale, bias=bias, registry=REGISTRY)
    selection = pipeline.select(signals, 64)
    for row in range(3):
        _check_row(selection, signals, row, scale, bias)


def _with_inputs(signals, lengths, seed):
    """``signals`` with decoder input embeddings: each row's image had ``lengths[b]`` tokens before any drop."""
    generator = torch.Generator().manual_seed(seed + 1000)
    batch, dim = signals.batch_size, signals.visual.shape[-1]
    width = max(lengths)
    return dataclasses.replace(
        signals,
        input_visual=torch.randn(batch, width, dim, generator=generator),  # (B, M, D)
        input_visual_mask=torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1),  # (B, M)
        input_prompt=torch.randn(signals.prompt.shape, generator=generator),  # (B, T, D)
    )


@pytest.mark.parametrize("seed", range(4))
def test_raters_come_from_the_input_embeddings_when_given(seed):
    """Official: the raters are chosen once from the decoder input embeddings (all the image's tokens, before any
    drop) and reused at every sparse layer. With ``input_visual`` / ``input_prompt`` the preset follows them; the
    per-point rule (this point's ``visual`` / ``prompt``) chooses other raters on these rows."""
    base = _signals([40, 23, 31], seed)
    signals = _with_inputs(base, [57, 23, 44], seed)
    pipeline = framework.compose("sparsevlm", scale=2.0, bias=1.0, registry=REGISTRY)
    selection = pipeline.select(signals, 64)
    for row in range(3):
        _check_row(selection, signals, row, 2.0, 1.0)
        alone = pipeline.select(signals.row(row), 64)
        assert alone.row_indices(0).tolist() == selection.row_indices(row).tolist()
    from_inputs = sv.text_raters(signals.input_visual, signals.input_prompt, signals.input_visual_mask, signals.prompt_mask)
    per_point = sv.text_raters(base.visual, base.prompt, base.valid(), base.prompt_mask)
    assert not torch.equal(from_inputs, per_point)
    assert pipeline.select(base, 64).indices.tolist() != selection.indices.tolist()
    scores = framework.compose("sparsevlm", registry=REGISTRY).relevance.score(signals)  # the stage alone
    rows = sv.rater_rows(signals.prompt_attention, from_inputs)
    torch.testing.assert_close(scores, rows.sum(1) / from_inputs.sum(1, keepdim=True))


def test_input_embedding_signals_are_checked():
    signals = _signals([6], 0)
    with pytest.raises(ValueError, match="input_visual_mask is set without"):
        dataclasses.replace(signals, input_visual_mask=torch.ones(1, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="input_visual must be"):
        dataclasses.replace(signals, input_visual=torch.zeros(1, 6, 3))
    with pytest.raises(ValueError, match="input_visual_mask must be"):
        dataclasses.replace(signals, input_visual=torch.zeros(1, 9, 16), input_visual_mask=torch.ones(1, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="shaped as Signals.prompt"):
        dataclasses.replace(signals, input_prompt=torch.zeros(1, 3, 16))


def test_batch_equals_alone():
    signals = _signals([40, 23, 31], 5)
    pipeline = framework.compose("sparsevlm", scale=2.0, bias=1.0, registry=REGISTRY)
    together = pipeline.select(signals, 64)
    for row in range(3):
        alone = pipeline.select(signals.row(row), 64)
        assert alone.row_indices(0).tolist() == together.row_indices(row).tolist()
        torch.testing.assert_close(alone.values[0][alone.mask[0]], together.values[row][together.mask[row]])


def test_near_ties_in_the_scores_go_to_the_lower_position():
    signals = _signals([30], 2, heads=1)
    attn = signals.prompt_attention.clone()
    attn[..., 10] = attn[..., 11]  # exact tie between two visual columns
    signals = type(signals)(**{**signals.__dict__, "prompt_attention": attn})
    _check_row(framework.compose("sparsevlm", scale=1.0, bias=3.0, registry=REGISTRY).select(signals, 64), signals, 0, 1.0, 3.0)


def test_full_rank_keeps_everything_and_recycles_nothing():
    signals = _signals([5], 1, prompt_len=12)  # rank can reach the 5 visual tokens
    selection = framework.compose("sparsevlm", scale=9.0, bias=6.0, registry=REGISTRY).select(signals, 128)
    kept, values, _ = ref_sparsevlm(signals.visual[0], signals.prompt[0], signals.prompt_attention[0], 9.0, 6.0)
    assert selection.row_indices(0).tolist() == sorted(kept + list(values))


def test_counts_are_adaptive_and_reported():
    signals = _signals([40, 23], 3)
    selection = framework.compose("sparsevlm", registry=REGISTRY).select(signals, 64)  # official 0.8 / 0
    raters = sv.text_raters(signals.visual, signals.prompt, signals.valid(), signals.prompt_mask)
    kept, clusters, _ = sv.rank_counts(signals.prompt_attention, raters, signals.valid(), 0.8, 0.0)
    assert selection.counts.tolist() == (kept + clusters).tolist()
    assert selection.critical.sum(1).tolist() == kept.tolist()


def test_cluster_and_merge_matches_the_loop_reference():
    generator = torch.Generator().manual_seed(0)
    for m, k in [(1, 1), (7, 1), (23, 3), (40, 5)]:
        x = torch.randn(m, 6, generator=generator)
        merged, centres, assignment = sv.cluster_and_merge(x, k)
        want_merged, want_centres, want_assign = ref_cluster_and_merge(x, k)
        assert centres.tolist() == want_centres and assignment.tolist() == want_assign
        torch.testing.assert_close(merged.double(), want_merged, rtol=1e-5, atol=1e-6)


def test_distances_are_the_official_difference_norms():
    """``pairwise_distances`` = the official ``(x1 - x2).norm(dim=-1)`` (differences, not the matrix-product
    expansion) to an ulp, symmetric with a zero diagonal, on hidden-state-like rows (large offset, outlier dims)."""
    generator = torch.Generator().manual_seed(1)
    for m, width in [(1, 8), (2, 8), (37, 64), (120, 512)]:
        x = torch.randn(m, width, generator=generator) * 3 + 40
        x[:, :2] *= 30
        got = sv.pairwise_distances(x)
        official = (x[:, None, :] - x[None, :, :]).norm(dim=-1, p=2)  # (M, M), utils.py cluster_and_merge
        torch.testing.assert_close(got, official, rtol=3e-7, atol=0)
        assert torch.equal(got, got.T) and bool((got.diagonal() == 0).all())
        exact = (x.double()[:, None, :] - x.double()[None, :, :]).norm(dim=-1)  # fp64 truth
        assert float(((got.double() - exact).abs() / exact.clamp(min=1e-30)).max()) < 1e-6


def test_cluster_and_merge_on_hidden_state_like_rows_matches_the_loop_reference():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(60, 32, generator=generator) * 2 + 25
    merged, centres, assignment = sv.cluster_and_merge(x, 7)
    want_merged, want_centres, want_assign = ref_cluster_and_merge(x, 7)
    assert centres.tolist() == want_centres and assignment.tolist() == want_assign
    torch.testing.assert_close(merged.double(), want_merged, rtol=1e-6, atol=1e-6)


def test_counts_formulas():
    assert sv.rank_keep_count(5, 5, 13.5, 0.0) == 5
    assert sv.rank_keep_count(3, 576, 13.5, 0.0) == 40  # int(40.5)
    assert sv.rank_keep_count(100, 576, 13.5, 0.0) == 575
    assert sv.recycle_counts(10) == (4, 1) and sv.recycle_counts(536) == (161, 17) and sv.recycle_counts(0) == (0, 0)
    assert sv.sparse_layers_for(32) == (3, 7, 16) and sv.sparse_layers_for(4) == (1, 2)


def test_budget_selects_the_official_pair_and_rejects_others():
    stage = framework.compose("sparsevlm", registry=REGISTRY).budget
    assert stage.scale_bias(192) == (13.5, 0.0) and stage.scale_bias(128) == (9.0, 6.0) and stage.scale_bias(64) == (0.8, 0.0)
    with pytest.raises(BudgetError, match="192"):  # no official setting for 100 of 200 tokens
        framework.compose("sparsevlm", registry=REGISTRY).select(_signals([200], 0), 100)
    # a budget asking for every token keeps the row whole (keep-all reproduces the unpruned model)
    whole = framework.compose("sparsevlm", registry=REGISTRY).select(_signals([20], 0), 100)
    assert whole.counts.tolist() == [20] and whole.values is None
    with pytest.raises(ValueError, match="scale and bias"):
        framework.compose("sparsevlm", scale=1.0, registry=REGISTRY)
    with pytest.raises(BudgetError):
        framework.compose("sparsevlm", registry=REGISTRY).select(_signals([20], 0), 0)


def test_recycle_row_covered_by_the_budget_keeps_all_in_a_batch_as_alone():
    """A stage that may keep fewer than asked (``recycle``): a ragged batch where one row's budget covers all its
    real tokens keeps that row whole and unmerged, exactly as the row alone does (regression: the keep-all
    shortcut used to apply only when every row of the batch was covered)."""
    from vtprune.testing import ragged_signals

    pipeline = framework.compose("prompt_cosine+critical+diversity.recycle", registry=REGISTRY)
    signals = ragged_signals([9, 6], seed=0)
    batch = pipeline.select(signals, 8)
    for row in range(2):
        alone = pipeline.select(signals.row(row), 8)
        assert batch.row_indices(row).tolist() == alone.row_indices(0).tolist()
    assert batch.row_indices(1).tolist() == list(range(6))
    assert batch.assignment is None or bool((batch.sizes[1][batch.mask[1]] == 1).all())
