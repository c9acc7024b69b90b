"""CDPruner as OpenVINO GenAI runs it (functional/cdpruner_ov.py, stages llm_text / dpp_ov, presets
cdpruner_llm / cdpruner_ov / cdpruner_ov_full) against the loop-style re-implementation of OpenVINO's C++
in tests/helpers/ov_cdpruner_reference.py."""

from __future__ import annotations

import numpy as np
import ov_cdpruner_reference as ref
import pytest
import torch

from vtprune.framework import compose
from vtprune.framework.signals import Signals
from vtprune.strategies.functional.cdpruner_ov import (
    ov_cdpruner_row,
    ov_greedy_map,
    ov_kernel,
    ov_keep_count,
    ov_minmax,
    ov_prompt_relevance,
    ov_split_parts,
    ov_text_feature,
)


def _data(seed: int, n: int = 64, d: int = 12, t: int = 5, snap: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(n, d, generator=g)  # (n, D)
    prompt = torch.randn(t, d, generator=g) + 0.5 * visual[:1]  # (T, D)
    if snap:
        visual = (visual / snap).round() * snap  # near-ties and exact duplicates
    return visual, prompt


def test_keep_count_matches_reference_and_the_issue() -> None:
    assert [ov_keep_count(64, r) for r in (50, 75, 90)] == [32, 16, 6]  # issue 20: 64 -> 32 / 16 / 6
    for total in range(1, 130):
        for ratio in range(0, 101):
            want = ref.keep_count(total, ratio)
            if want == 0:
                with pytest.raises(ValueError, match="too small"):
                    ov_keep_count(total, ratio)
            else:
                assert ov_keep_count(total, ratio) == want, (total, ratio)


@pytest.mark.parametrize("bad", [-1, 101, 0.5, True, "50"])
def test_keep_count_rejects_bad_ratios(bad) -> None:
    with pytest.raises((ValueError, TypeError), match="pruning_ratio"):
        ov_keep_count(64, bad)


def test_split_parts() -> None:
    assert ov_split_parts(65, 7) == [(0, 32, 3), (32, 65, 4)]
    assert ov_split_parts(1, 1) == [(0, 1, 1)]  # N must exceed the threshold
    assert ov_split_parts(64, 7, split_threshold=64) == [(0, 64, 7)]
    with pytest.raises(ValueError, match="split_threshold"):
        ov_split_parts(64, 7, split_threshold=-1)


@pytest.mark.parametrize("seed", range(3))
def test_relevance_and_kernel_match_reference(seed: int) -> None:
    visual, prompt = _data(seed, n=20)
    text = ov_text_feature(prompt)
    np.testing.assert_allclose(text.numpy(), ref.text_feature(prompt.numpy()), rtol=1e-6, atol=1e-7)
    raw = ov_prompt_relevance(visual, prompt)
    raw_ref = ref.relevance(visual.numpy(), ref.text_feature(prompt.numpy()))
    np.testing.assert_allclose(raw.numpy(), np.array(raw_ref), rtol=1e-5, atol=1e-6)
    for weight in (0.0, 0.5, 1.0):
        got = ov_kernel(visual, ov_minmax(raw), weight)
        np.testing.assert_allclose(got.numpy(), ref.kernel(visual.numpy(), raw_ref, weight), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("snap", [0.0, 0.5])
def test_greedy_matches_reference_on_the_same_kernel(seed: int, snap: float) -> None:
    visual, prompt = _data(seed, n=24, d=6, snap=snap)
    raw = ref.relevance(visual.numpy(), ref.text_feature(prompt.numpy()))
    kernel = ref.kernel(visual.numpy(), raw, 0.5)
    for steps in (1, 6, 12, 24):  # 24 > rank 6: the NaN / -FLT_MAX path
        got = ov_greedy_map(torch.from_numpy(kernel), steps)
        assert got == ref.greedy(kernel, steps)
        assert len(set(got)) == steps


def test_greedy_on_a_degenerate_kernel_keeps_distinct_tokens() -> None:
    kernel = torch.ones(5, 5)  # rank 1: every later gain is ~0 or NaN
    picks = ov_greedy_map(kernel, 5)
    assert sorted(picks) == list(range(5)) and picks == ref.greedy(kernel.numpy(), 5)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("ratio", [50, 75, 90])
@pytest.mark.parametrize("split_threshold", [1, 0])
def test_select_matches_reference(seed: int, ratio: int, split_threshold: int) -> None:
    # D > N: a full-rank kernel, so the picks do not hinge on float noise (the summation order of the
    # similarity matmul differs from the C++ loops); past the rank see the same-kernel greedy test
    visual, prompt = _data(seed, d=72)
    keep = ov_keep_count(64, ratio)
    raw = ov_prompt_relevance(visual, prompt)
    got = ov_cdpruner_row(visual, raw, keep, 0.5, split_threshold).tolist()
    want = ref.select(visual.numpy(), ref.text_feature(prompt.numpy()), keep, 0.5, split_threshold)
    assert got == want
    assert len(got) == keep


def test_split_changes_the_selection_and_balances_halves() -> None:
    visual, prompt = _data(1)
    raw = ov_prompt_relevance(visual, prompt)
    split = ov_cdpruner_row(visual, raw, 16, split_threshold=1)
    full = ov_cdpruner_row(visual, raw, 16, split_threshold=0)
    assert int((split < 32).sum()) == 8 and int((split >= 32).sum()) == 8
    assert split.tolist() != full.tolist()


def _signals(seed: int, lengths=(64, 40), prompt_lengths=(5, 3)) -> Signals:
    g = torch.Generator().manual_seed(seed)
    batch, n, t, d = len(lengths), max(lengths), max(prompt_lengths), 12
    visual = torch.randn(batch, n, d, generator=g)  # (B, N, D)
    prompt = torch.randn(batch, t, d, generator=g)  # (B, T, D)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]  # (B, N)
    pmask = torch.arange(t)[None, :] < torch.tensor(prompt_lengths)[:, None]  # (B, T)
    return Signals(visual=visual, visual_mask=mask, prompt=prompt, prompt_mask=pmask)


@pytest.mark.parametrize("preset,split", [("cdpruner_ov", 1), ("cdpruner_ov_full", 0)])
def test_presets_select_what_openvino_selects_per_row(preset: str, split: int) -> None:
    signals = _signals(0)
    selection = compose(preset).select(signals, 12)
    for b, (n, t) in enumerate(((64, 5), (40, 3))):
        visual, prompt = signals.visual[b, :n], signals.prompt[b, :t]
        want = ref.select(visual.numpy(), ref.text_feature(prompt.numpy()), 12, 0.5, split)
        assert selection.indices[b][selection.mask[b]].tolist() == want


def test_cdpruner_llm_uses_llm_relevance_with_the_paper_kernel() -> None:
    signals = _signals(2, lengths=(30,), prompt_lengths=(4,))
    scores = compose("relevance.llm_text+critical+dpp+split(critical=0.0)+pre_llm").relevance.score(signals)
    raw = ov_prompt_relevance(signals.visual[0], signals.prompt[0])
    torch.testing.assert_close(scores[0], ov_minmax(raw))
    assert int(compose("cdpruner_llm").select(signals, 7).mask.sum()) == 7


def test_stage_parameters_are_checked() -> None:
    with pytest.raises(Exception, match="relevance_weight"):
        compose("relevance.llm_text+critical+dpp_ov(relevance_weight=1.5)+split(critical=0.0)+pre_llm")
    with pytest.raises(Exception, match="split_threshold"):
        compose("relevance.llm_text+critical+dpp_ov(split_threshold=-1)+split(critical=0.0)+pre_llm")


def test_llm_text_needs_the_prompt() -> None:
    signals = Signals(visual=torch.randn(1, 8, 4))
    with pytest.raises(Exception, match="prompt"):
        compose("cdpruner_ov").select(signals, 4)
