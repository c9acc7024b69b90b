"""The organism's clutter task (issue 18): scenes, questions, training glue, the demo option, auto_split.yaml.

Scenes are checked against their contract (one object per patch, the target unique in the asked
attribute, hard "no" negatives absent from the scene, determinism, split disjointness); training
batches mix clutter and shapes scenes; ``--task clutter`` has its own defaults while the default
command still reproduces the shipped weights; ``experiments/configs/auto_split.yaml`` plans (93 cells)
and ``vtprune demo --task clutter`` points the demo grid at the clutter task and its weights.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from vtprune.experiments.organism.clutter import (
    CLUTTER_OBJECTS,
    CLUTTER_TEMPLATES,
    clutter_scene_samples,
    clutter_training_scene,
    make_clutter_split,
)
from vtprune.experiments.organism.task import COLORS, N_PATCHES, SHAPES, make_split


def test_clutter_scene_contract() -> None:
    samples = make_clutter_split("validation", 90)
    assert Counter(s.template for s in samples) == {t: 30 for t in CLUTTER_TEMPLATES}
    answers = Counter(s.answer for s in samples if s.template == "exists")
    assert answers["yes"] > 5 and answers["no"] > 5
    for s in samples:
        n = len(s.objects)
        assert CLUTTER_OBJECTS[0] <= n <= CLUTTER_OBJECTS[1]
        assert s.image.shape == (64, 64, 3) and s.patch_labels.shape == (N_PATCHES,)
        # every object owns exactly one visual token
        assert sorted(Counter(s.patch_labels[s.patch_labels >= 0].tolist()).items()) == [(k, 1) for k in range(n)]
        target = s.objects[0]
        kinds = [(o.color, o.shape) for o in s.objects]
        assert kinds.count((target.color, target.shape)) == 1
        if s.template == "shape":
            assert s.question == f"what shape is the {target.color} one ?" and s.answer == target.shape
            assert [o.color for o in s.objects].count(target.color) == 1
        elif s.template == "color":
            assert s.question == f"what color is the {target.shape} ?" and s.answer == target.color
            assert [o.shape for o in s.objects].count(target.shape) == 1
        elif s.answer == "yes":
            assert s.target_objects == [0] and s.question == f"is there a {target.color} {target.shape} ?"
        else:
            words = s.question.split()
            color, shape = words[3], words[4]
            assert color in COLORS and shape in SHAPES and (color, shape) not in kinds and s.target_objects == []
            assert color == target.color or shape == target.shape  # a hard negative


def test_clutter_is_deterministic_and_splits_differ() -> None:
    a, b = clutter_scene_samples("test", 7), clutter_scene_samples("test", 7)
    assert [s.question for s in a] == [s.question for s in b] and np.array_equal(a[0].image, b[0].image)
    assert not np.array_equal(clutter_scene_samples("validation", 7)[0].image, a[0].image)
    # a different random stream from the shapes task with the same index
    assert len(clutter_scene_samples("test", 7)[0].objects) >= CLUTTER_OBJECTS[0] > len(make_split("test", 8)[7].objects)
    with pytest.raises(KeyError, match="validation"):
        clutter_scene_samples("dev", 0)


def test_training_scene_has_both_exists_answers() -> None:
    for i in range(20):
        _, questions = clutter_training_scene("train", i)
        assert {a for t, _, a, _ in questions if t == "exists"} == {"yes", "no"}
        assert len({q for _, q, _, _ in questions}) == len(questions) in (3, 4)  # both "no" negatives may appear


def test_mixed_batches_alternate_tasks_and_shapes_batches_are_unchanged() -> None:
    torch = pytest.importorskip("torch")
    from vtprune.experiments.organism.batching import TrainBatcher

    mixed = TrainBatcher(turns=4, task="mixed").batch([0, 1, 2, 3])
    shapes = TrainBatcher(turns=4).batch([0, 1, 2, 3])
    # odd indices are the shapes scenes, identical to the shapes-only batch
    for b in (1, 3):
        assert torch.equal(mixed["pixel_values"][b], shapes["pixel_values"][b])
    objects = (mixed["patch_pos"][:, :, 2] != mixed["patch_pos"][0, :, 2].min()).sum(1)  # (B,) object patches
    assert int(objects[0]) >= CLUTTER_OBJECTS[0] and int(objects[2]) >= CLUTTER_OBJECTS[0]
    with pytest.raises(ValueError, match="mixed"):
        TrainBatcher(task="cluter")


def test_task_defaults() -> None:
    from dataclasses import asdict

    from vtprune.experiments.organism.train import TrainConfig, parse_args

    shapes = parse_args(["--out", "x"])
    assert asdict(shapes) == asdict(TrainConfig(out="x"))
    assert (shapes.task, shapes.init) == ("shapes", "")
    clutter = parse_args(["--out", "x", "--task", "clutter"])
    assert (clutter.task, clutter.init) == ("clutter", "shipped") and clutter.steps < shapes.steps
    assert parse_args(["--out", "x", "--task", "clutter", "--steps", "7"]).steps == 7
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--task", "nope"])


def test_short_clutter_finetune_runs(tmp_path) -> None:
    from vtprune.experiments.organism import WEIGHTS_DIR
    from vtprune.experiments.organism.train import TrainConfig, train

    if not (WEIGHTS_DIR / "model.safetensors").exists():
        pytest.skip("organism weights not shipped")
    cfg = TrainConfig(out=str(tmp_path / "run"), task="clutter", init="shipped", steps=2, batch_size=4, turns=2,
                      warmup=1, ckpt_every=2, eval_every=2, n_val=6, n_test=6, workers=0)
    weights = train(cfg)
    metrics = json.loads((weights / "metrics.json").read_text())
    assert metrics["n_samples"] == 6 and "overall" in metrics["shapes"]["accuracy"]


def test_shipped_clutter_weights() -> None:
    from vtprune.experiments.organism import WEIGHTS_DIR

    folder = WEIGHTS_DIR.parent / "weights_clutter"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["config"]["task"] == "clutter" and metrics["accuracy"]["overall"] >= 0.97
    assert (folder / "model.safetensors").stat().st_size < 10 * 2**20


def test_auto_split_config_plans(capsys) -> None:
    from vtprune.cli import main
    from vtprune.experiments.config import CONFIG_DIR

    assert main(["plan", str(CONFIG_DIR / "auto_split.yaml")]) == 0
    out = capsys.readouterr().out
    assert "93 cells (3 unpruned baselines)" in out  # 10 methods x 3 budgets x 3 tasks + 3 unpruned
    assert out.count("weights_clutter task.options.scenes=clutter") == 30 and "scenes=shapes budget=12 method.recipe=zspaprune_auto" in out
    assert out.count("weights_clutter task.options.scenes=crowd") == 30 and "weights task.options.scenes=crowd" not in out


def test_demo_task_option() -> None:
    from vtprune.cli import DEMO_TASKS, build_parser, demo_grid_path
    from vtprune.experiments.config import load_grid

    args = build_parser().parse_args(["demo", "--task", "clutter"])
    assert args.task == "clutter"
    spec = load_grid(demo_grid_path(), list(DEMO_TASKS["clutter"]) + ["grid.budget=[0.1]"])
    cell = spec.cells[-1].config
    assert cell["task"]["options"]["scenes"] == "clutter" and cell["model"]["name"].endswith("weights_clutter")
    assert str(spec.output_dir).endswith("demo_clutter")
    crowd = load_grid(demo_grid_path(), list(DEMO_TASKS["crowd"]) + ["grid.budget=[0.1]"]).cells[-1].config
    assert crowd["task"]["options"]["scenes"] == "crowd" and crowd["model"]["name"].endswith("weights_clutter")


def test_organism_task_scenes_option() -> None:
    from vtprune.experiments.organism.vqa_task import OrganismTask

    task = OrganismTask(split="test", n=6, scenes="clutter")
    assert [s.meta["template"] for s in task.samples()] == list(CLUTTER_TEMPLATES) * 2
    assert task.templates() == CLUTTER_TEMPLATES
    with pytest.raises(ValueError, match="clutter"):
        OrganismTask(scenes="clutterr")


@pytest.mark.slow  # runs the organism 4 times on 12 questions
def test_split_oracle_matches_the_pipeline() -> None:
    """``split_outcomes`` row c is what the pipeline answers with c critical tokens (checked through a fixed split)."""
    from vtprune.experiments.organism import load_organism
    from vtprune.experiments.organism.split_oracle import chosen_critical_counts, split_outcomes

    model, processor = load_organism()
    samples = make_clutter_split("validation", 12)
    out = split_outcomes(model, processor, samples, budget=2)
    assert out.correct.shape == (12, 3) and out.scores.shape == (12, 64) and out.visual.shape[:2] == (12, 64)
    counts, correct = chosen_critical_counts(model, processor, samples, 2, recipe="zspaprune+split(critical=1.0)")
    assert counts.tolist() == [2] * 12 and np.array_equal(correct, out.correct[:, 2])


def test_split_rows_reads_the_oracle_at_each_allocators_count() -> None:
    """``split_rows``: fixed split r reads column round_half_up(r K); auto reads its own count (loop check)."""
    from vtprune.experiments.organism.split_table import interval, split_rows
    from vtprune.strategies.budget import AutoSplit

    rng = np.random.default_rng(0)
    budget, n_rows = 4, 40
    correct = rng.random((n_rows, budget + 1)) < 0.5  # (S, C)
    scores = rng.normal(size=(n_rows, 64)).astype(np.float32)  # (S, N)
    scores[:10, 3] = 5.0  # ten rows with one standout token
    rows, chosen = split_rows(correct, scores, budget, AutoSplit())
    for r in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        c = int(np.floor(r * budget + 0.5))
        assert rows[f"critical {r}"] == interval(correct[:, c])
    assert rows["auto"] == interval(np.array([correct[i, chosen[i]] for i in range(n_rows)]))
    assert chosen[:10].tolist() == [1] * 10 and set(chosen[10:].tolist()) <= {0, 1}
    p, half = interval(np.array([True] * 9 + [False]))
    assert p == 0.9 and abs(half - 1.959963984540054 * (0.09 / 10) ** 0.5) < 1e-12
