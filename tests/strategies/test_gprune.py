"""G-Prune: `functional.gprune` and the `gprune` preset against the official op order (tests/helpers/gprune_reference.py).

Seeded inputs, exact equality: scores, kept sets (official ``topk(int(keep_ratio * n))``), exact ties (duplicated
tokens), ragged batches (each row equals the reference on its real tokens; a batch equals each row alone; padding is
never part of a graph), keep-all, and the graph maths on inputs whose answer is known by hand. Rows of several views
(``view_index``, LLaVA-NeXT's base image and crops with newlines): the official two-graph block (`official_next_keep`)
at every fraction, in any batch, with padding.
"""

from __future__ import annotations

import pytest
import torch

from gprune_reference import official_keep, official_keep_count, official_next_keep, official_scores
from vtprune.framework import Signals, build_registry, compose
from vtprune.strategies.functional.gprune import gprune_row_scores, gprune_scores, gprune_view_count, gprune_view_keys

REGISTRY = build_registry(autoload=False)
SEEDS = range(4)


def _tokens(n: int, dim: int, seed: int, clusters: int = 4) -> torch.Tensor:
    """(n, dim): tokens around a few centres, so the graph has edges above the 0.5 cosine cut and cut ones."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=generator)
    owner = torch.randint(0, clusters, (n,), generator=generator)
    scale = torch.rand(n, 1, generator=generator) + 0.5
    return (centres[owner] + 0.6 * torch.randn(n, dim, generator=generator)) * scale


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n, dim", [(12, 8), (25, 16), (36, 5)])
def test_scores_equal_the_official_op_order(seed: int, n: int, dim: int) -> None:
    x = _tokens(n, dim, seed)
    got = gprune_row_scores(x, 0.5, 0.03, 5)
    assert torch.equal(got, official_scores(x.clone()))
    assert torch.equal(gprune_scores(x[None], None, 0.5, 0.03, 5)[0], got)
    # the graph has both kinds of edges on these inputs (the cut matters)
    cosine = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(x, dim=1).t()
    assert bool((cosine < 0.5).any()) and bool(((cosine >= 0.5) & ~torch.eye(n, dtype=torch.bool)).any())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("params", [dict(similarity=0.3, temperature=0.1, iterate_num=2), dict(similarity=0.7, temperature=0.05, iterate_num=0)])
def test_parameters_follow_the_official_code(seed: int, params: dict) -> None:
    x = _tokens(20, 6, seed)
    got = gprune_row_scores(x, params["similarity"], params["temperature"], params["iterate_num"])
    assert torch.equal(got, official_scores(x.clone(), **params))


def test_hand_checked_graphs() -> None:
    """Orthogonal tokens: no edge but the self loop, A = I, degree 1: the score is the token's norm. Two identical
    tokens and a third orthogonal one: the pair shares its flow (each gets the pair's mean norm) / degree 2."""
    x = torch.diag(torch.tensor([3.0, 1.0, 2.0, 5.0]))
    assert torch.equal(gprune_row_scores(x, 0.5, 0.03, 5), torch.tensor([3.0, 1.0, 2.0, 5.0]))
    pair = torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 1.0]])  # rows 0 and 1: cosine 1; norms 2 and 4
    scores = gprune_row_scores(pair, 0.5, 0.03, 5)
    torch.testing.assert_close(scores, torch.tensor([1.5, 1.5, 1.0]), rtol=0, atol=1e-6)  # (2+4)/2 / 2 ; 1 / 1


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("budget", [0.5, 0.25, 0.1, 7])
def test_preset_keeps_the_official_set(seed: int, budget) -> None:
    pipeline = compose("gprune", registry=REGISTRY)
    x = _tokens(30, 8, seed)
    selection = pipeline.select(Signals(visual=x[None]), budget)
    count = official_keep_count(budget, 30) if isinstance(budget, float) else budget
    assert selection.row_indices(0).tolist() == official_keep(x.clone(), count)


@pytest.mark.parametrize("seed", SEEDS)
def test_exact_ties_follow_torch_topk_on_the_slice(seed: int) -> None:
    """Duplicated tokens score exactly alike; the kept set is what the official ``topk`` keeps."""
    base = _tokens(8, 6, seed)
    x = torch.cat([base, base, base[:4]])  # (20, 6): every score tied at least twice
    scores = gprune_row_scores(x, 0.5, 0.03, 5)
    assert torch.equal(scores[:8], scores[8:16])
    pipeline = compose("gprune", registry=REGISTRY)
    for count in (3, 5, 9, 13):
        selection = pipeline.select(Signals(visual=x[None]), count)
        assert selection.row_indices(0).tolist() == official_keep(x.clone(), count)


@pytest.mark.parametrize("seed", SEEDS)
def test_ragged_batch_equals_each_row_alone(seed: int) -> None:
    lengths = [30, 17, 24]
    width = max(lengths)
    rows = [_tokens(n, 8, seed * 10 + i) for i, n in enumerate(lengths)]
    visual = torch.full((3, width, 8), 7.0)  # padding: large, identical tokens that would dominate a shared graph
    mask = torch.zeros(3, width, dtype=torch.bool)
    for i, row in enumerate(rows):
        visual[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = True
    signals = Signals(visual=visual, visual_mask=mask)
    scores = gprune_scores(visual, mask, 0.5, 0.03, 5)
    pipeline = compose("gprune", registry=REGISTRY)
    selection = pipeline.select(signals, 0.5)
    for i, row in enumerate(rows):
        assert torch.equal(scores[i, : lengths[i]], official_scores(row.clone()))
        assert bool((scores[i, lengths[i] :] == 0).all())
        assert selection.row_indices(i).tolist() == official_keep(row.clone(), official_keep_count(0.5, lengths[i]))
        alone = pipeline.select(Signals(visual=row[None]), 0.5)
        assert selection.row_indices(i).tolist() == alone.row_indices(0).tolist()


def test_keep_all_and_bad_parameters() -> None:
    x = _tokens(12, 4, 0)
    pipeline = compose("gprune", registry=REGISTRY)
    for budget in (1.0, 12, 100):
        assert pipeline.select(Signals(visual=x[None]), budget).row_indices(0).tolist() == list(range(12))
    for bad in (dict(temperature=0.0), dict(similarity=1.5), dict(iterations=-1)):
        with pytest.raises(Exception, match=next(iter(bad))):
            compose("gprune", registry=REGISTRY, **bad)


def _next_row(base: int, rows: int, cols: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One LLaVA-NeXT-like image: (n, dim) tokens (base image, then ``rows`` rows of ``cols`` tokens + one shared
    newline vector each) and its (n,) view index (0 base, 1 crops, -1 newlines)."""
    x = _tokens(base + rows * cols, dim, seed)
    newline = torch.randn(dim, generator=torch.Generator().manual_seed(100 + seed))
    crops = x[base:].view(rows, cols, dim)
    packed = torch.cat([x[:base], torch.cat([crops, newline.expand(rows, 1, dim)], dim=1).flatten(0, 1)])  # (n, dim)
    views = torch.cat([torch.zeros(base, dtype=torch.long), torch.tensor(([1] * cols + [-1]) * rows)])
    return packed, views


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("budget", [0.5, 0.25, 0.3, 0.77, 1 / 64])
def test_views_keep_the_official_two_graph_block(seed: int, budget: float) -> None:
    x, views = _next_row(16, 4, 7, 8, seed)
    signals = Signals(visual=x[None], view_index=views[None])
    got = compose("gprune", registry=REGISTRY).select(signals, budget)
    want = official_next_keep(x.clone(), 16, 4, 7, keep_ratio=budget)
    assert got.row_indices(0).tolist() == want
    assert len(want) == gprune_view_count(budget, [16, 28], 4)


@pytest.mark.parametrize("seed", SEEDS)
def test_views_ragged_batch_equals_each_row_alone(seed: int) -> None:
    shapes = [(16, 4, 7), (16, 8, 3), (9, 3, 3)]
    rows = [_next_row(*shape, 6, seed + i) for i, shape in enumerate(shapes)]
    width = max(x.shape[0] for x, _ in rows)
    visual = torch.zeros(len(rows), width, 6)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    views = torch.full((len(rows), width), -1, dtype=torch.long)
    for b, (x, v) in enumerate(rows):
        visual[b, : x.shape[0]], valid[b, : x.shape[0]], views[b, : x.shape[0]] = x, True, v
    pipeline = compose("gprune", registry=REGISTRY)
    batch = pipeline.select(Signals(visual=visual, visual_mask=valid, view_index=views), 0.5)
    for b, ((x, v), shape) in enumerate(zip(rows, shapes)):
        alone = pipeline.select(Signals(visual=x[None], view_index=v[None]), 0.5)
        assert batch.row_indices(b).tolist() == alone.row_indices(0).tolist()
        assert alone.row_indices(0).tolist() == official_next_keep(x.clone(), *shape, keep_ratio=0.5)
    whole = pipeline.select(Signals(visual=visual, visual_mask=valid, view_index=views), 1.0)
    assert whole.counts.tolist() == valid.sum(1).tolist()


def test_one_view_rows_keep_the_single_graph_and_bad_views_are_refused() -> None:
    x = _tokens(30, 8, 0)
    plain = compose("gprune", registry=REGISTRY).select(Signals(visual=x[None]), 0.5)
    one_view = compose("gprune", registry=REGISTRY).select(Signals(visual=x[None], view_index=torch.zeros(1, 30, dtype=torch.long)), 0.5)
    assert plain.row_indices(0).tolist() == one_view.row_indices(0).tolist() == official_keep(x.clone(), 15)
    with pytest.raises(ValueError, match="view_index"):
        Signals(visual=x[None], view_index=torch.full((1, 30), -2, dtype=torch.long))
    with pytest.raises(ValueError, match="float32"):
        gprune_view_keys(torch.zeros(8, 2), [torch.arange(5000), torch.arange(5000)], 0.5, 0.03, 5)
