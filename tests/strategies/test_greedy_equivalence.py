"""The optimised selection kernels pick exactly what the previous loops picked (issue 19).

``tests/helpers/greedy_reference.py`` holds verbatim copies of the loops before the op-count work; here both
run on random inputs built to hit the hard cases: exact duplicates (tied similarities), rounded
values (tied scores), zero vectors (NaN distances in DivPrune's official arithmetic), NaN features,
padding,
empty and non-empty selected sets, ragged counts.
"""

from __future__ import annotations

import greedy_reference as reference
import pytest
import torch

from vtprune.framework.selection import selection_from_masks
from vtprune.strategies.functional import cdpruner, common, divprune, farthest_point

KINDS = ("gauss", "duplicates", "rounded", "zeros", "nan")


def _case(seed: int, kind: str, dense: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch, tokens, dim = 1 + seed % 3, 6 + (7 * seed) % 30, 2 + seed % 7
    x = torch.randn(batch, tokens, dim, generator=g)
    if kind == "duplicates":
        x = x[:, torch.randint(0, 4, (tokens,), generator=g)]
    elif kind == "rounded":
        x = torch.round(x)
    elif kind == "zeros":
        x[:, torch.randint(0, tokens, (2,), generator=g)] = 0.0
    elif kind == "nan":  # non-finite features: the loops' guarded path
        x[:, torch.randint(0, tokens, (1,), generator=g)] = float("nan")
    valid = torch.ones(batch, tokens, dtype=torch.bool) if dense or seed % 3 == 0 else torch.rand(batch, tokens, generator=g) > 0.2
    selected = (torch.rand(batch, tokens, generator=g) > 0.8) & valid
    if seed % 4 == 0:
        selected[:] = False
    elif seed % 4 == 1:
        selected[0] = False  # one empty row among non-empty ones
    free = (valid & ~selected).sum(dim=1)
    counts = torch.minimum(torch.randint(0, tokens, (batch,), generator=g), free)
    scores = torch.round(2 * torch.randn(batch, tokens, generator=g))  # many ties
    return dict(x=x, valid=valid, selected=selected, counts=counts, scores=scores, g=g)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(12))
def test_farthest_point_picks_unchanged(seed: int, kind: str) -> None:
    c = _case(seed, kind)
    for scores in (None, c["scores"]):
        old = reference.farthest_point_select(c["x"], c["selected"], c["counts"], c["valid"], scores)
        assert torch.equal(farthest_point.farthest_point_select(c["x"], c["selected"], c["counts"], c["valid"], scores), old)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(12))
def test_divprune_picks_unchanged(seed: int, kind: str) -> None:
    c = _case(seed, kind)
    old = reference.divprune_supplement(c["x"], c["selected"], c["counts"], c["valid"])
    assert torch.equal(divprune.divprune_supplement(c["x"], c["selected"], c["counts"], c["valid"]), old)
    old = reference.divprune_select(c["x"], c["counts"], c["valid"])
    assert torch.equal(divprune.divprune_select(c["x"], c["counts"], c["valid"]), old)


@pytest.mark.parametrize("kind", ("gauss", "duplicates", "rounded", "nan"))
@pytest.mark.parametrize("seed", range(8))
def test_cdpruner_picks_unchanged(seed: int, kind: str) -> None:
    c = _case(seed, kind)
    batch, tokens, _ = c["x"].shape
    clip_visual, clip_text = torch.randn(batch, tokens, 6, generator=c["g"]), torch.randn(batch, 3, 6, generator=c["g"])
    relevance = reference.cdpruner_relevance(clip_visual, clip_text, c["valid"])
    assert torch.equal(cdpruner.cdpruner_relevance(clip_visual, clip_text, c["valid"]), relevance)
    for theta in (None, 0.5):
        old = reference.cdpruner_supplement(c["x"], relevance, c["selected"], c["counts"], c["valid"], theta)
        assert torch.equal(cdpruner.cdpruner_supplement(c["x"], relevance, c["selected"], c["counts"], c["valid"], theta), old)
        old = reference.cdpruner_select(c["x"], clip_visual, clip_text, c["counts"], c["valid"], theta=theta)
        assert torch.equal(cdpruner.cdpruner_select(c["x"], clip_visual, clip_text, c["counts"], c["valid"], theta=theta), old)


@pytest.mark.parametrize("seed", range(12))
def test_top_k_and_selection_assembly_unchanged(seed: int) -> None:
    c = _case(seed, "rounded")
    assert torch.equal(common.topk_keep(c["scores"], c["counts"], c["valid"]), reference.topk_keep(c["scores"], c["counts"], c["valid"]))
    critical = c["selected"]
    keep = critical | (torch.rand(critical.shape, generator=c["g"]) > 0.5) & c["valid"]
    values = torch.randn(*keep.shape, 3, generator=c["g"])
    new, old = selection_from_masks(keep, critical, values), reference.selection_from_masks_reference(keep, critical, values)
    for name in ("indices", "mask", "critical", "values"):
        assert torch.equal(getattr(new, name), old[name])


@pytest.mark.parametrize("kind", ("gauss", "duplicates", "rounded"))
@pytest.mark.parametrize("seed", range(8))
def test_sync_free_variants_pick_the_same_on_unpadded_rows(seed: int, kind: str) -> None:
    """The variants a compiled select runs (int counts, no host sync), called eagerly. fps builds its
    seed state from a full similarity matrix, which may round differently: compared on untied data."""
    c = _case(seed, kind, dense=True)
    count = int(c["counts"].min())
    counts = torch.full_like(c["counts"], count)
    old = reference.divprune_supplement(c["x"], c["selected"], counts, c["valid"])
    assert torch.equal(divprune._divprune_supplement_static(c["x"], c["selected"], count, c["valid"]), old)
    old = reference.topk_keep(c["scores"], counts, c["valid"])
    assert torch.equal(common._topk_keep_static(c["scores"], count, c["valid"]), old)
    if kind == "gauss":
        for scores in (None, c["scores"] + 0.01 * torch.randn(c["scores"].shape, generator=c["g"])):
            old = reference.farthest_point_select(c["x"], c["selected"], counts, c["valid"], scores)
            assert torch.equal(farthest_point._farthest_point_static(c["x"], c["selected"], count, c["valid"], scores), old)


@pytest.mark.parametrize("seed", range(6))
def test_cdpruner_unguarded_loop_stands_only_while_residuals_are_positive(seed: int) -> None:
    """With no conditioning picks CDPruner runs the official loop without the per-step exclusion and keeps its
    picks while every residual is finite and > 0; past the kernel's rank (more picks than the feature width 3)
    the guarded loop takes over. Both: the reference loop's picks, all distinct."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 20, 3, generator=g)
    relevance = torch.rand(1, 20, generator=g)
    none = torch.zeros(1, 20, dtype=torch.bool)
    for count in (1, 2, 3, 4, 10, 20):
        new = cdpruner.cdpruner_supplement(x, relevance, none, count)
        assert torch.equal(new, reference.cdpruner_supplement(x, relevance, none, count))
        assert int(new.sum()) == count
