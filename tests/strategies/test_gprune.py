"""G-Prune: `functional.gprune` and the `gprune` preset against the official op order (tests/helpers/gprune_reference.py).

Seeded inputs, exact equality: scores, kept sets (official ``topk(int(keep_ratio * n))``), exact ties (duplicated
tokens), ragged batches (each row equals the reference on its real tokens; a batch equals each row alone; padding is
never part of a graph), keep-all, and the graph maths on inputs whose answer is known by hand.
"""

from __future__ import annotations

import pytest
import torch

from gprune_reference import official_keep, official_keep_count, official_scores
from vtprune.framework import Signals, build_registry, compose
from vtprune.strategies.functional.gprune import gprune_row_scores, gprune_scores

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
