"""The organism's crowd task (issue 18): scenes, questions, the task option, the split tuner, auto_split.yaml.

Scenes are checked against their contract (one object per patch, a crowd of 4-8 copies of one kind whose
colour no distractor has, the question about that colour, the targets the whole crowd, determinism, split
disjointness and a seed stream of its own); ``OrganismTask(scenes="crowd")`` serves it; ``split_tune`` ranks the
``gap`` allocator's settings on saved oracles exactly as the per-row oracle arithmetic says.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from vtprune.experiments.organism.clutter import CLUTTER_OBJECTS, make_clutter_split
from vtprune.experiments.organism.crowd import CROWD_SIZE, CROWD_TEMPLATES, crowd_sample, make_crowd_split
from vtprune.experiments.organism.task import COLORS, N_PATCHES, SHAPES


def test_crowd_scene_contract() -> None:
    samples = make_crowd_split("validation", 120)
    sizes = Counter(len(s.target_objects) for s in samples)
    assert set(sizes) == set(range(CROWD_SIZE[0], CROWD_SIZE[1] + 1))
    assert set(s.answer for s in samples) == set(SHAPES) and len({s.question.split()[4] for s in samples}) == len(COLORS)
    for s in samples:
        n, m = len(s.objects), len(s.target_objects)
        assert CLUTTER_OBJECTS[0] <= n <= CLUTTER_OBJECTS[1] and m < n
        assert s.image.shape == (64, 64, 3) and s.patch_labels.shape == (N_PATCHES,)
        # every object owns exactly one visual token
        assert sorted(Counter(s.patch_labels[s.patch_labels >= 0].tolist()).items()) == [(k, 1) for k in range(n)]
        crowd = s.objects[0]
        assert s.target_objects == list(range(m)) and s.template == "shape"
        assert all((o.color, o.shape) == (crowd.color, crowd.shape) for o in s.objects[:m])
        assert all(o.color != crowd.color for o in s.objects[m:])  # the crowd's colour is its own
        assert s.question == f"what shape is the {crowd.color} one ?" and s.answer == crowd.shape


def test_crowd_is_deterministic_and_splits_differ() -> None:
    a, b = crowd_sample("test", 5), crowd_sample("test", 5)
    assert a.question == b.question and np.array_equal(a.image, b.image)
    assert not np.array_equal(crowd_sample("validation", 5).image, a.image)
    assert not np.array_equal(make_clutter_split("test", 6)[5].image, a.image)  # its own seed stream
    assert [s.question for s in make_crowd_split("test", 3, start=4)] == [crowd_sample("test", k).question for k in (4, 5, 6)]
    with pytest.raises(KeyError, match="validation"):
        crowd_sample("dev", 0)
    with pytest.raises(ValueError, match="n_samples"):
        make_crowd_split("test", -1)


def test_organism_task_serves_the_crowd() -> None:
    from vtprune.experiments.organism.vqa_task import OrganismTask, organism_split

    task = OrganismTask(split="test", n=4, scenes="crowd")
    got = list(task.samples())
    assert [s.meta["template"] for s in got] == ["shape"] * 4 and task.templates() == CROWD_TEMPLATES
    assert [s.question for s in got] == [s.question for s in organism_split("crowd", "test", 4)]
    # target_kept: every crowd member must keep a token
    labels = organism_split("crowd", "test", 1)[0].patch_labels
    members = [int(np.flatnonzero(labels == k)[0]) for k in range(len(organism_split("crowd", "test", 1)[0].target_objects))]
    assert task.selection_scores(got[0], [members]) == {"target_kept": 1.0}
    assert task.selection_scores(got[0], [members[1:]]) == {"target_kept": 0.0}
    with pytest.raises(ValueError, match="crowd"):
        organism_split("crowds", "test", 1)


def test_split_tune_ranks_settings_by_the_oracle_arithmetic(tmp_path) -> None:
    """On synthetic oracles where only "the whole standout set" is right, the best setting keeps exactly that set."""
    from vtprune.experiments.organism.split_table import BUDGETS, TASK_WEIGHTS
    from vtprune.experiments.organism.split_tune import load_oracles, main, rank_settings

    rng = np.random.default_rng(0)
    for task in TASK_WEIGHTS:
        for budget in BUDGETS:
            rows = 30
            scores = rng.uniform(-0.3, -0.1, size=(rows, 64)).astype(np.float32)  # (S, N)
            size = rng.integers(1, 4, size=rows)  # a standout set of 1-3 tokens, 0.5 above the rest
            for r in range(rows):
                scores[r, : size[r]] = 0.4 + 0.01 * np.arange(size[r])
            correct = np.zeros((rows, budget + 1), dtype=bool)  # (S, C)
            correct[np.arange(rows), np.minimum(size, max(budget - 1, 0))] = True
            np.savez(tmp_path / f"{task}_{budget}.npz", correct=correct, scores=scores)
    ranked = rank_settings(load_oracles(tmp_path), drops=(0.3, 0.6), reserves=(1, 3), windows=(2, 8), extends=(1.0, 2.0))
    best = ranked[0]
    assert (best.drop, best.reserve, best.window, best.extend) == (0.3, 1, 8, 1.0) and best.mean_gap <= 0.0
    assert all(a.key <= b.key for a, b in zip(ranked, ranked[1:]))
    assert main([str(tmp_path), "--top", "2"]) == 0
    with pytest.raises(FileNotFoundError, match="split_table"):
        load_oracles(tmp_path / "none")


def test_kept_composition_counts_every_kept_token() -> None:
    """``crowd_kept``: the kinds add up to the budget, critical tokens go to the crowd first, accuracy in [0, 1]."""
    from vtprune.experiments.organism import WEIGHTS_DIR, load_organism
    from vtprune.experiments.organism.crowd_kept import kept_composition

    model, processor = load_organism(path=WEIGHTS_DIR.parent / "weights_clutter")
    samples = make_crowd_split("validation", 6)
    diverse = kept_composition(model, processor, samples, budget=6, critical=0)
    relevant = kept_composition(model, processor, samples, budget=6, critical=4)
    for c in (diverse, relevant):
        assert abs(c.crowd + c.same_shape + c.other_shape + c.background - 6) < 1e-9 and 0 <= c.accuracy <= 1
    assert relevant.crowd == 4 > diverse.crowd  # every sample has >= 4 crowd members, ranked first by relevance
