"""ZSPAPrune's maths against a small independent reference (plain numpy loops, written from the paper)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vtprune.framework import Signals, compose


def reference_zspaprune(visual: np.ndarray, prompt: np.ndarray, budget: int, ratio: float, pool: str = "mean") -> tuple[list[int], list[int]]:
    """One sample: returns (kept indices ascending, critical indices ascending)."""

    def unit(v):
        return v / max(np.linalg.norm(v), 1e-12)

    if pool == "mean":
        query = unit(prompt.mean(axis=0))
        scores = [float(unit(v) @ query) for v in visual]
    else:  # token_max
        scores = [max(float(unit(v) @ unit(p)) for p in prompt) for v in visual]
    n = len(visual)
    total = min(budget, n)
    n_critical = min(int(math.floor(total * ratio + 0.5)), total)
    # top-k, ties to the lower index
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    critical = sorted(order[:n_critical])
    selected = list(critical)
    if not selected and total > 0:
        selected = [order[0]]  # seed rule: highest score
        extra = [order[0]]
    else:
        extra = []
    while len(selected) < total:
        best, best_value = None, None
        for i in range(n):
            if i in selected:
                continue
            closest = max(float(unit(visual[i]) @ unit(visual[j])) for j in selected)
            if best_value is None or closest < best_value:
                best, best_value = i, closest
        selected.append(best)
    return sorted(selected), critical


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("pool", ["mean", "token_max"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(ratio: float, pool: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    visual = rng.normal(size=(2, 30, 16)).astype(np.float32)
    prompt = rng.normal(size=(2, 6, 16)).astype(np.float32)
    pipeline = compose("zspaprune", critical=ratio, pool=pool)
    selection = pipeline.select(Signals(visual=torch.from_numpy(visual), prompt=torch.from_numpy(prompt)), 10)
    for row in range(2):
        kept, critical = reference_zspaprune(visual[row], prompt[row], 10, ratio, pool)
        assert selection.row_indices(row).tolist() == kept
        assert selection.indices[row][selection.critical[row]].tolist() == critical


def test_ties_go_to_lower_index() -> None:
    visual = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    prompt = torch.tensor([[[1.0, 0.0]]])
    selection = compose("zspaprune", critical=1.0).select(Signals(visual=visual, prompt=prompt), 2)
    assert selection.row_indices(0).tolist() == [0, 2]


def test_fps_adds_the_least_similar_token() -> None:
    # critical picks token 0 (aligned with the prompt); fps must then pick the opposite token 3
    visual = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.8, 0.3], [-1.0, 0.05]]])
    prompt = torch.tensor([[[1.0, 0.0]]])
    selection = compose("zspaprune", critical=0.5).select(Signals(visual=visual, prompt=prompt), 2)
    assert selection.row_indices(0).tolist() == [0, 3]
    assert selection.critical[0].tolist() == [True, False]


def test_kept_tokens_keep_original_order_and_values() -> None:
    generator = torch.Generator().manual_seed(0)
    visual = torch.randn(1, 12, 4, generator=generator)
    prompt = torch.randn(1, 3, 4, generator=generator)
    selection = compose("zspaprune").select(Signals(visual=visual, prompt=prompt), 5)
    kept = selection.gather(visual)
    assert torch.equal(kept[0], visual[0, selection.row_indices(0)])


def test_cpu_chunking_never_changes_the_result(monkeypatch) -> None:
    from vtprune.strategies.functional import farthest_point

    generator = torch.Generator().manual_seed(3)
    visual = torch.randn(5, 40, 8, generator=generator)
    valid = torch.arange(40).unsqueeze(0) < torch.tensor([[40], [31], [40], [12], [25]])
    selected = torch.zeros(5, 40, dtype=torch.bool)
    selected[:, :3] = True
    selected[1, 0] = False
    counts = torch.tensor([9, 7, 5, 4, 6])
    whole = farthest_point.farthest_point_select(visual, selected, counts, valid)
    monkeypatch.setattr(farthest_point, "CPU_CHUNK_BYTES", 2 * 40 * 8 * 4)  # two rows per chunk
    assert torch.equal(farthest_point.farthest_point_select(visual, selected, counts, valid), whole)
