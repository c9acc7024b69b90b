"""The large-target probe of issue 18 (``experiments/organism/large_target.py``; measured, not shipped).

Scenes are checked against their contract (a multi-token target of unique colour, one-token
distractors clear of the target's box, determinism, disjoint splits, the answer), the interior-token
helper on a hand-made grid, and the curves on the shipped clutter weights (unpruned accuracy, shapes).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from vtprune.experiments.organism.clutter import CLUTTER_OBJECTS
from vtprune.experiments.organism.large_target import (
    STYLES,
    TARGET_SIDE,
    interior_tokens,
    large_target_sample,
    make_large_target_split,
    render_large_target_scene,
    split_curves,
)
from vtprune.experiments.organism.task import IMAGE_SIZE, N_PATCHES, PATCH, SHAPES

GRID = IMAGE_SIZE // PATCH


@pytest.mark.parametrize("style", STYLES)
def test_large_target_scene_contract(style: str) -> None:
    samples = make_large_target_split("validation", 60, style)
    assert set(Counter(s.answer for s in samples)) == set(SHAPES)
    for s in samples:
        n = len(s.objects)
        target = s.objects[0]
        assert CLUTTER_OBJECTS[0] <= n <= CLUTTER_OBJECTS[1] and s.patch_labels.shape == (N_PATCHES,)
        assert s.question == f"what shape is the {target.color} one ?" and s.answer == target.shape
        assert s.template == "shape" and s.target_objects == [0]
        assert [o.color for o in s.objects].count(target.color) == 1  # the colour names the target alone
        assert TARGET_SIDE[0] <= target.size <= TARGET_SIDE[1]
        counts = Counter(s.patch_labels[s.patch_labels >= 0].tolist())
        assert counts[0] > 1  # the target spans several visual tokens
        assert all(counts[k] == 1 for k in range(1, n))  # every distractor owns exactly one token
        half = target.size / 2
        for k in range(1, n):  # distractor cells lie outside the target's bounding box
            cell = int(np.flatnonzero(s.patch_labels == k)[0])
            y0, x0 = (cell // GRID) * PATCH, (cell % GRID) * PATCH
            assert y0 >= target.cy + half or y0 + PATCH <= target.cy - half or x0 >= target.cx + half or x0 + PATCH <= target.cx - half


def test_large_target_is_deterministic_and_splits_and_styles_differ() -> None:
    a, b = large_target_sample("test", 3), large_target_sample("test", 3)
    assert a.question == b.question and np.array_equal(a.image, b.image)
    assert not np.array_equal(large_target_sample("validation", 3).image, a.image)
    outline = large_target_sample("test", 3, "outline")
    assert [(o.color, o.shape, o.cy, o.cx) for o in outline.objects] == [(o.color, o.shape, o.cy, o.cx) for o in a.objects]
    assert not np.array_equal(outline.image, a.image)


def test_unknown_style_names_the_choices() -> None:
    with pytest.raises(ValueError, match="filled"):
        render_large_target_scene(np.random.default_rng(0), "hollow")


def test_interior_tokens() -> None:
    labels = np.full(N_PATCHES, -1)
    block = [r * GRID + c for r in range(0, 4) for c in range(2, 5)]  # rows 0-3, columns 2-4
    labels[block] = 0
    inner = interior_tokens(labels)
    # the top row touches the image border (no neighbour above): only rows 1-2, column 3 are interior
    assert np.flatnonzero(inner).tolist() == [1 * GRID + 3, 2 * GRID + 3]


@pytest.mark.slow  # loads the organism and runs it 4 times on 20 questions
def test_curves_on_the_clutter_weights() -> None:
    from vtprune.experiments.organism import WEIGHTS_DIR, load_organism
    from vtprune.experiments.organism.evaluate import answer

    model, processor = load_organism(path=WEIGHTS_DIR.parent / "weights_clutter")
    samples = make_large_target_split("validation", 20)
    preds = np.array(answer(model, processor, samples))
    assert np.mean(preds == np.array([s.answer for s in samples])) >= 0.95  # measured 0.993 on 1000
    cur = split_curves(model, processor, samples, budget=2)
    assert cur["correct"].shape == (20, 3) and cur["per_critical"].shape == (3,)
    assert cur["auto_counts"].sum() == 20 and cur["top1_interior"].shape == (20,)
    assert 0.0 <= cur["top_on_target"] <= 1.0 and set(cur["rows"]) >= {"critical 0.0", "auto", "diversity only"}
