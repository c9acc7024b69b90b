"""PruneVid (strategies/functional/prunevid.py, strategies/prunevid.py) against the loop-style re-implementation of
the official functions in tests/helpers/prunevid_reference.py, on seeded videos (static backgrounds, moving regions,
scene cuts, near ties), ragged batches and batch == alone."""

from __future__ import annotations

import random

import pytest
import torch

from prunevid_reference import ref_merge_video, ref_process_attention, ref_refine, ref_segment_lengths
from vtprune.framework import compose
from vtprune.framework.signals import Signals
from vtprune.strategies.functional.prunevid import group_keep, prunevid_frames, refine_segments, segment_lengths, span_groups
from vtprune.testing.signals import make_video_signals


@pytest.mark.parametrize("seed", range(40))
def test_refine_and_segments_equal_the_official_loops(seed):
    rng = random.Random(seed)
    labels = [rng.randrange(rng.randint(1, 5)) for _ in range(rng.randint(1, 16))]
    assert refine_segments(labels) == ref_refine(labels)
    assert segment_lengths(refine_segments(labels)) == ref_segment_lengths(ref_refine(labels))


def test_refine_edge_cases():
    assert refine_segments([0, 1, 0, 1]) == [0, 0, 0, 0]  # every cluster dissolved: cluster 0
    assert refine_segments([0, 0, 1, 0, 0]) == [0, 0, 0, 0, 0]  # tied longest runs both kept, the 1 joins left
    assert refine_segments([2, 2, 1, 0, 0, 0]) == [2, 2, 0, 0, 0, 0]  # joins the longer right run


def _video(spec, seed, cuts=(), near_ties=False, dim=8):
    return make_video_signals([spec], dim=dim, seed=seed, cuts=[cuts], near_ties=near_ties)


def _check_row(row, segments, groups, tokens):
    got_segments = row.segments
    assert got_segments == segments
    flat = tokens.reshape(-1, tokens.shape[-1])
    for g, members in enumerate(groups):
        positions = torch.nonzero(row.groups == g).squeeze(1).tolist()
        assert positions == sorted(p for p, _ in members)
        for p, value in members:
            assert torch.allclose(row.values[p], torch.tensor(value), atol=1e-5)
    assert int(row.keep.sum()) == sum(len(m) for m in groups)
    # every token is merged into a kept token of its own frame or its segment's first frame
    assert bool(row.keep[row.assignment].all())
    assert bool((row.assignment[row.keep] == torch.nonzero(row.keep).squeeze(1)).all())
    del flat


@pytest.mark.parametrize(
    "spec, cuts, near_ties, seed",
    [((8, 5, 5), (), False, 0), ((8, 5, 5), (4,), False, 1), ((12, 4, 5), (3, 8), False, 2), ((8, 5, 5), (5,), True, 3),
     ((6, 6, 6), (), True, 4), ((5, 4, 4), (2,), False, 5)],
)
def test_merge_equals_the_official_merge_frames_dynamic(spec, cuts, near_ties, seed):
    signals = _video(spec, seed, cuts, near_ties)
    t_len, h, w = spec
    tokens = signals.visual[0].view(t_len, h * w, -1)
    for tau, cluster_ratio, segment_ratio in ((0.8, 0.5, 0.25), (0.5, 0.3, 0.5)):
        row = prunevid_frames(tokens, tau, cluster_ratio, segment_ratio, 7, torch.Generator().manual_seed(seed))
        segments, groups = ref_merge_video(tokens.double(), tau, cluster_ratio, segment_ratio, torch.Generator().manual_seed(seed))
        _check_row(row, segments, groups, tokens)


def test_scene_cut_gives_segments_and_static_background_merges():
    signals = _video((16, 5, 5), 0, cuts=(8,))
    tokens = signals.visual[0].view(16, 25, -1)
    row = prunevid_frames(tokens, 0.8, 0.5, 0.25, 7, torch.Generator().manual_seed(0))
    assert row.segments == [8, 8]  # the cut splits the video
    assert int(row.keep.sum()) < 16 * 25 // 2  # static backgrounds averaged over each segment


def _preset_reference(signals: Signals, b: int, seed: int = 0):
    t_len, h, w = signals.row_frames()[b]
    index = signals.frame_index[b]
    inside = torch.nonzero(index >= 0).squeeze(1)
    tokens = signals.visual[b, inside].view(t_len, h * w, -1)
    _, groups = ref_merge_video(tokens.double(), 0.8, 0.5, 0.25, torch.Generator().manual_seed(seed))
    kept = {int(inside[p]): v for members in groups for p, v in members}
    others = torch.nonzero((index < 0) & signals.valid()[b]).squeeze(1).tolist()
    for p in others:
        kept[p] = signals.visual[b, p].tolist()
    return kept


def test_preset_selection_ragged_batch_equals_alone_and_reference():
    signals = make_video_signals([(8, 5, 5), (6, 4, 5)], dim=8, seed=11, cuts=[[4], [3]], newlines="video")
    pipeline = compose("prunevid")
    selection = pipeline.select(signals, 1.0)
    for b in range(2):
        expected = _preset_reference(signals, b)
        got = selection.indices[b][selection.mask[b]].tolist()
        assert got == sorted(expected)
        values = selection.values[b][selection.mask[b]]
        for slot, p in enumerate(got):
            assert torch.allclose(values[slot], torch.tensor(expected[p]), atol=1e-5)
        assert int(selection.sizes[b][selection.mask[b]].sum()) == int(signals.valid()[b].sum())
        alone = pipeline.select(signals.row(b), 1.0)
        n = int(alone.mask.sum())
        assert alone.indices[0, :n].tolist() == got
        assert torch.equal(alone.values[0, :n], values)


def test_budget_caps_with_the_largest_merged_tokens():
    signals = make_video_signals([(8, 5, 5)], dim=8, seed=3, cuts=[[4]])
    pipeline = compose("prunevid")
    full = pipeline.select(signals, 1.0)
    capped = pipeline.select(signals, 10)
    assert capped.indices.shape[1] == 10 < full.indices.shape[1]
    sizes = dict(zip(full.indices[0].tolist(), full.sizes[0].tolist()))
    kept_sizes = sorted((sizes[p] for p in capped.indices[0].tolist()), reverse=True)
    assert kept_sizes == sorted(sizes.values(), reverse=True)[:10]


def test_row_without_frames_is_one_frame_all_dynamic():
    x = torch.randn(1, 20, 8, generator=torch.Generator().manual_seed(0))
    selection = compose("prunevid").select(Signals(visual=x), 1.0)
    assert selection.indices.shape[1] == 10  # int(20 * 0.5) DPC-KNN clusters


@pytest.mark.parametrize("seed", range(5))
def test_group_keep_equals_process_attention(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [int(s) for s in torch.randint(0, 9, (6,), generator=g)]
    scores = torch.randint(0, 4, (sum(sizes),), generator=g).float()  # many ties
    groups = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)]).long()
    keep = group_keep(scores, groups, 0.4)
    assert torch.nonzero(keep).squeeze(1).tolist() == ref_process_attention(scores.tolist(), sizes, 0.4)


def test_in_llm_step_keeps_int_alpha_by_max_prompt_attention():
    pipeline = compose("prunevid")
    layer = pipeline.placement.drop_pipeline(pipeline, 1)
    assert pipeline.placement.drop_pipeline(pipeline, 0) is pipeline
    assert [d.where for d in pipeline.placement.drops(1.0)] == ["pre_llm", "layer"]
    g = torch.Generator().manual_seed(0)
    attention = torch.rand(2, 3, 4, 25, generator=g)
    prompt_mask = torch.tensor([[True] * 4, [True, True, False, False]])
    signals = Signals(visual=torch.randn(2, 25, 8, generator=g), prompt=torch.randn(2, 4, 8, generator=g),
                      prompt_mask=prompt_mask, prompt_attention=attention)
    selection = layer.select(signals, 0.4)
    for b in range(2):
        score = attention[b][:, prompt_mask[b]].amax(dim=0).amax(dim=0)
        assert selection.indices[b].tolist() == ref_process_attention(score.tolist(), [25], 0.4)


def _spans_of(assignment: torch.Tensor, frame_of: torch.Tensor) -> dict[int, tuple[int, int]]:
    """Loop reference: kept position -> (first, last) frame of the tokens assigned to it."""
    spans: dict[int, list[int]] = {}
    for token, target in enumerate(assignment.tolist()):
        if target >= 0 and int(frame_of[token]) >= 0:
            spans.setdefault(target, []).append(int(frame_of[token]))
    return {p: (min(f), max(f)) for p, f in spans.items()}


@pytest.mark.parametrize("spec, cuts, seed", [((8, 5, 5), (4,), 0), ((12, 4, 5), (3, 8), 2), ((6, 6, 6), (), 4), ((5, 4, 4), (1,), 5)])
def test_span_groups_recover_the_merge_groups(spec, cuts, seed):
    """The groups of the first drop, as `frame_span` carries them to the second: the same partition of the kept
    tokens as `prunevid_frames`' own group labels (static per segment, dynamic per frame)."""
    t_len, h, w = spec
    tokens = _video(spec, seed, cuts).visual[0].view(t_len, h * w, -1)
    for tau in (0.8, 0.3):
        row = prunevid_frames(tokens, tau, 0.5, 0.25, 7, torch.Generator().manual_seed(seed))
        frame_of = torch.arange(t_len).repeat_interleave(h * w)
        spans = _spans_of(row.assignment, frame_of)
        kept = torch.nonzero(row.keep).squeeze(1)
        span = torch.tensor([spans[int(p)] for p in kept])
        ours = span_groups(span).tolist()
        official = row.groups[kept].tolist()
        pairs = set(zip(ours, official))
        assert len(pairs) == len(set(ours)) == len(set(official))  # a bijection between the labels
    assert span_groups(torch.tensor([[-1, -1], [2, 2], [2, 5]])).tolist() == [-1, 5, 4]


def _second_drop(signals: Signals, seed: int):
    """The first drop's selection on ``signals`` and the signals of a second drop over its kept tokens: their merged
    values, their `frame_span` (loop reference over the assignment) and seeded prompt attention with ties."""
    first = compose("prunevid").select(signals, 1.0)
    g = torch.Generator().manual_seed(seed)
    rows, spans, lengths = [], [], []
    for b in range(signals.batch_size):
        kept = first.indices[b][first.mask[b]]
        slot_of = first.assignment[b]
        assignment = torch.where(slot_of >= 0, first.indices[b][slot_of.clamp(min=0)], torch.full_like(slot_of, -1))
        by_pos = _spans_of(assignment, signals.frame_index[b])
        spans.append(torch.tensor([by_pos.get(int(p), (-1, -1)) for p in kept]))
        rows.append(first.values[b][first.mask[b]])
        lengths.append(kept.numel())
    width = max(lengths)
    visual = torch.zeros(len(rows), width, rows[0].shape[-1])
    span = torch.full((len(rows), width, 2), -1, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, (row, sp) in enumerate(zip(rows, spans)):
        visual[b, : row.shape[0]], span[b, : row.shape[0]], mask[b, : row.shape[0]] = row, sp, True
    attention = torch.randint(0, 6, (len(rows), 2, 3, width), generator=g).float() / 6  # many ties
    later = Signals(visual=visual, visual_mask=mask, prompt=torch.randn(len(rows), 3, visual.shape[-1], generator=g),
                    prompt_attention=attention, frame_span=span)
    return first, later


def test_in_llm_step_keeps_int_alpha_of_every_group():
    """Issue 15: the second drop keeps ``int(size * alpha)`` of each group of the first drop (official
    ``process_attention`` over the static group of each segment and each frame's dynamic group, with the groups of
    the official merge), newlines kept; a ragged batch equals each row alone."""
    signals = make_video_signals([(8, 5, 5), (6, 4, 5)], dim=8, seed=11, cuts=[[4], [3]], newlines="video")
    first, later = _second_drop(signals, 3)
    pipeline = compose("prunevid")
    layer = pipeline.placement.drop_pipeline(pipeline, 1)
    selection = layer.select(later, 0.4)
    for b in range(2):
        t_len, h, w = signals.row_frames()[b]
        inside = torch.nonzero(signals.frame_index[b] >= 0).squeeze(1)
        tokens = signals.visual[b, inside].view(t_len, h * w, -1)
        _, groups = ref_merge_video(tokens.double(), 0.8, 0.5, 0.25, torch.Generator().manual_seed(0))
        kept = first.indices[b][first.mask[b]].tolist()
        score = later.prompt_attention[b].amax(dim=0).amax(dim=0)  # (N,)
        slot = {p: i for i, p in enumerate(kept)}
        expected, sizes = [], []
        order = []
        for members in groups:  # official order: per segment its static group, then each frame's dynamic group
            order.extend(sorted(slot[int(inside[p])] for p, _ in members))
            sizes.append(len(members))
        laid = [float(score[i]) for i in order]
        expected = sorted(order[j] for j in ref_process_attention(laid, sizes, 0.4))
        newlines = [i for i, p in enumerate(kept) if int(signals.frame_index[b, p]) < 0]
        assert newlines  # the video's newline token stays
        got = selection.indices[b][selection.mask[b]].tolist()
        assert got == sorted(expected + newlines)
        alone = layer.select(later.row(b), 0.4)
        assert alone.indices[0][alone.mask[0]].tolist() == got
    every = compose("prunevid", alpha=1.0)
    full = every.placement.drop_pipeline(every, 1).select(later, 1.0)
    assert torch.equal(full.mask.sum(1), later.valid().sum(1))  # alpha 1.0 keeps every token


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="cluster_ratio"):
        compose("prunevid", cluster_ratio=0.0)
    with pytest.raises(ValueError, match="alpha"):
        compose("prunevid", alpha=1.5)
