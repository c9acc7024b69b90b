"""FastVID and HoliTom (issue 15) against plain loop-style references of the official functions
(tests/helpers/density_video_reference.py), on seeded videos from `make_video_signals`."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from density_video_reference import ref_fastvid, ref_holitom, ref_inner_merge

from vtprune.framework import build_registry, compose
from vtprune.strategies.functional.fastvid import anchor_counts, dyseg_segments, fastvid_frames
from vtprune.strategies.functional.holitom import holitom_frames, holitom_windows, inner_merge, static_window_counts
from vtprune.strategies.functional.video import frame_attention
from vtprune.testing import make_video_signals

CASES = [
    dict(frames=[(8, 4, 4)], cuts=[[3]], near_ties=False),
    dict(frames=[(6, 4, 5)], cuts=[[]], near_ties=True),
    dict(frames=[(12, 3, 4)], cuts=[[4, 9]], near_ties=False),
]


def _video(case, seed=0):
    s = make_video_signals(case["frames"], dim=12, seed=seed, cuts=case["cuts"], near_ties=case["near_ties"])
    t, h, w = case["frames"][0]
    return s.visual[0, : t * h * w].view(t, h * w, -1)


def _kept_dict(keep, values):
    return {(int(t), int(s)): values[t, s] for t, s in torch.nonzero(keep).tolist()}


def _same(ours, ref):
    assert set(ours) == set(ref)
    for key in ref:
        torch.testing.assert_close(ours[key].float(), ref[key].float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("ratio,p", [(0.5, 4), (0.75, 2), (0.25, 1)])
def test_fastvid_matches_reference(case, ratio, p):
    tokens = _video(case)
    salience = frame_attention(tokens)
    glob = tokens.mean(dim=1)
    ours = fastvid_frames(tokens, salience, glob, ratio, c=3, tau=0.9, d=0.4, p=p, beta=0.6,
                          generator=torch.Generator().manual_seed(3))
    ref = ref_fastvid(tokens, salience, glob, ratio, c=3, tau=0.9, d=0.4, p=p, beta=0.6,
                      gen=torch.Generator().manual_seed(3))
    _same(_kept_dict(ours.keep, ours.values), ref)
    # every kept token is assigned to itself; merged tokens point at kept tokens
    flat = torch.arange(ours.keep.numel()).view_as(ours.keep)
    assert torch.equal(ours.assignment[ours.keep], flat[ours.keep])
    targets = ours.assignment[ours.assignment >= 0]
    assert bool(ours.keep.view(-1)[targets].all())


def test_dyseg_cuts_at_scene_cuts():
    tokens = _video(dict(frames=[(12, 4, 4)], cuts=[[4, 9]], near_ties=False))
    segments = dyseg_segments(tokens.mean(dim=1), c=3, tau=0.0)
    assert segments == [4, 5, 3]
    assert anchor_counts([5, 1], 3, 2) == [15 // 3, 0, 15 // 3, 0, 15 // 3, 3]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("ratio,tau", [(0.25, 0.8), (0.5, 0.95), (0.1, 0.5)])
def test_holitom_matches_reference(case, ratio, tau):
    tokens = _video(case)
    attn = frame_attention(tokens)
    ours = holitom_frames(tokens, attn, ratio, tau=tau, generator=torch.Generator().manual_seed(5))
    ref, windows = ref_holitom(tokens, attn, ratio, tau=tau, gen=torch.Generator().manual_seed(5))
    assert ours.windows == windows
    _same(_kept_dict(ours.keep, ours.values), ref)


def test_holitom_windows_static_video_is_one_window():
    sim = torch.ones(5, 10)  # 6 frames, every token static
    assert holitom_windows(sim, 0.8, 1024) == ([(0, 5)], 50.0)
    assert holitom_windows(sim, 0.8, 2) == ([(0, 1), (2, 3), (4, 5)], 30.0)
    counts = static_window_counts(torch.tensor([[0.9, 0.1], [0.9, 0.9]]), 0.8)
    assert counts.tolist() == [[0, 1, 2], [0, 0, 2], [0, 0, 0]]  # token 0 static over both transitions, token 1 over the second


@pytest.mark.parametrize("keep_count", [1, 5, 11])
def test_inner_merge_matches_official_loop(keep_count):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(17, 8, generator=gen, dtype=torch.float64)
    scores = torch.rand(17, generator=gen, dtype=torch.float64)
    keep, values, target = inner_merge(hidden, scores, keep_count)
    ref = ref_inner_merge(hidden, scores, keep_count)
    assert set(torch.nonzero(keep).squeeze(1).tolist()) == set(ref)
    for pos, value in ref.items():
        torch.testing.assert_close(values[pos], value)
    assert bool(keep[target].all())


@pytest.mark.parametrize("name", ["fastvid", "holitom"])
@pytest.mark.parametrize("newlines", ["none", "frame", "video"])
def test_preset_batch_equals_alone(name, newlines):
    video = make_video_signals([(8, 4, 4), (5, 3, 4), (2, 3, 4)], dim=12, seed=2, cuts=[[4], []], newlines=newlines)
    frames, index = video.frames.clone(), video.frame_index.clone()
    frames[2] = 0  # row 2 is not a video: one frame of all its real tokens
    index[2] = -1
    signals = dataclasses.replace(video, frames=frames, frame_index=index)
    pipeline = compose(name, registry=build_registry(autoload=False))
    batch = pipeline.select(signals, 0.3)
    for b in range(3):
        alone = pipeline.select(signals.row(b), 0.3)
        k = int(alone.counts[0])
        assert int(batch.counts[b]) == k
        assert torch.equal(batch.indices[b, :k], alone.indices[0, :k])
        torch.testing.assert_close(batch.values[b, :k], alone.values[0, :k])
        assert torch.equal(batch.sizes[b, :k], alone.sizes[0, :k])
    # newline tokens are always kept; every kept slot stands for at least itself
    newline = (index < 0) & signals.valid()
    newline[2] = False
    assert bool(batch.kept_mask(signals.num_tokens)[newline].all())
    assert bool((batch.sizes[batch.mask] >= 1).all())


def test_presets_reduce_and_adapt():
    signals = make_video_signals([(8, 4, 4)], dim=12, seed=4, cuts=[[4]])
    registry = build_registry(autoload=False)
    for name in ("fastvid", "holitom"):
        sel = compose(name, registry=registry).select(signals, 0.25)
        assert 0 < int(sel.counts[0]) <= 128 * 0.25 + 8
        assert int(sel.sizes.sum()) <= 128


def test_holitom_placement_drops_and_errors():
    pipeline = compose("holitom", registry=build_registry(autoload=False))
    drops = pipeline.placement.drops(0.15)
    assert [(d.where, d.layer, d.budget) for d in drops] == [("pre_llm", None, 0.15), ("layer", 18, 0.5)]
    with pytest.raises(Exception, match="keep"):
        compose("holitom", registry=build_registry(autoload=False), keep=0.0)
    with pytest.raises(Exception, match="beta"):
        compose("fastvid", registry=build_registry(autoload=False), beta=2.0)


@pytest.mark.parametrize("diversity", ["fastvid", "holitom"])
@pytest.mark.parametrize("frames", [[(8, 1, 1)], [(3, 2, 3)], [(1, 1, 1)]])
def test_frame_grid_broken_by_critical_tokens_is_one_frame(diversity, frames):
    """Regression: a critical selector taking frame tokens first left fewer free tokens than T*H*W and the frame
    view failed (``shape '[8, 1]' is invalid``); such a row is now one frame of its free tokens."""
    signals = make_video_signals(frames, dim=8, seed=1)
    pipeline = compose(f"prompt_cosine+critical+diversity.{diversity}", registry=build_registry(autoload=False))
    for budget in (1, 2, 5, 0.5, 0.9):
        selection = pipeline.select(signals, budget)
        assert 1 <= int(selection.counts[0]) <= int(signals.valid().sum())


def test_video_allocators_are_adaptive_and_the_inner_merge_is_its_own_stage():
    """``budget.fastvid`` / ``budget.holitom`` hand the resolved total to the method, which keeps its own count;
    ``pre_llm_layer`` runs HoliTom's inner merge (``relevance.last_attention`` + ``holitom_inner``) at its second drop."""
    registry = build_registry(autoload=False)
    fastvid, holitom = compose("fastvid", registry=registry), compose("holitom", registry=registry)
    assert fastvid.budget.adaptive_counts and holitom.budget.adaptive_counts
    assert type(fastvid.diversity).exact_counts is False and type(holitom.diversity).exact_counts is False
    assert "attention" not in holitom.requires  # the drop before the LLM has no attention
    inner = holitom.placement.drop_pipeline(holitom, 1)
    assert holitom.placement.drop_pipeline(holitom, 0) is holitom
    assert (inner.relevance.name, inner.diversity.name, inner.budget.name) == ("last_attention", "holitom_inner", "holitom_layer")
    assert "attention" in inner.requires and "last_token_query" in inner.relevance.adapter_hints  # official [0, -1]
    prompt = compose("holitom", registry=registry, query="prompt")
    assert prompt.placement.drop_pipeline(prompt, 1).relevance.name == "attention"
    with pytest.raises(ValueError, match="query"):
        compose("holitom", registry=registry, query="first")
    same = compose("holitom", registry=registry, layer_step="same")
    assert same.placement.drop_pipeline(same, 1) is same
    signals = make_video_signals([(4, 3, 3)], dim=8, seed=3)
    attention = torch.rand(1, 2, signals.num_tokens, generator=torch.Generator().manual_seed(0))
    at_layer = dataclasses.replace(signals, attention=attention.softmax(-1), frames=None, frame_index=None)
    selection = inner.select(at_layer, 0.5)
    assert int(selection.counts[0]) == round(36 * 0.5)  # exact: round half to even of the present tokens
    ref = ref_inner_merge(at_layer.visual[0], at_layer.attention[0].mean(0), 18)
    assert set(selection.indices[0].tolist()) == set(ref)
