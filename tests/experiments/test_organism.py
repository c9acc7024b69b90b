"""Tests of the model organism: task generation, processor, training smoke run, shipped weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vtprune.experiments.organism import WEIGHTS_DIR
from vtprune.experiments.organism.batching import TrainBatcher
from vtprune.experiments.organism.processor import NUM_IMAGE_TOKENS, build_processor, build_prompt
from vtprune.experiments.organism.task import (
    BG_LEVEL,
    COLORS,
    COUNT_WORDS,
    N_PATCHES,
    PATCH,
    SPLIT_SEEDS,
    SPLIT_SPAN,
    TEMPLATES,
    make_split,
    render_scene,
    scene_rng,
    scene_samples,
)


# ---------------------------------------------------------------- task
def test_generation_is_deterministic() -> None:
    a, b = make_split("train", 24), make_split("train", 24)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.image, y.image)
        assert (x.question, x.answer, x.template, x.target_objects) == (y.question, y.answer, y.template, y.target_objects)
        assert np.array_equal(x.patch_labels, y.patch_labels)


def test_splits_are_disjoint() -> None:
    bases = sorted(SPLIT_SEEDS.values())
    assert all(b - a >= SPLIT_SPAN for a, b in zip(bases, bases[1:]))
    train = {s.image.tobytes() for s in make_split("train", 60)}
    test = {s.image.tobytes() for s in make_split("test", 60)}
    val = {s.image.tobytes() for s in make_split("validation", 60)}
    assert not (train & test) and not (train & val) and not (val & test)


def test_sample_fields_and_template_balance() -> None:
    samples = make_split("test", 200)
    counts = {t: sum(s.template == t for s in samples) for t in TEMPLATES}
    assert all(c >= 40 for c in counts.values()), counts
    for s in samples:
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert s.patch_labels.shape == (N_PATCHES,)
        assert len(s.answer.split()) == 1
        if s.template == "count":
            assert s.answer == COUNT_WORDS[len(s.objects) - 1]
            assert s.target_objects == list(range(len(s.objects)))
        if s.template == "exists":
            assert (s.answer == "yes") == bool(s.target_objects)


def test_patch_labels_match_drawn_colours() -> None:
    for idx in range(40):
        for s in scene_samples("validation", idx)[:1]:
            grid = s.image.reshape(8, PATCH, 8, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(N_PATCHES, -1, 3)
            for k, obj in enumerate(s.objects):
                patches = np.flatnonzero(s.patch_labels == k)
                assert patches.size > 0, "every object covers at least one patch"
                ref = np.array(COLORS[obj.color], dtype=float)
                for p in patches:
                    dist = np.linalg.norm(grid[p].astype(float) - ref, axis=1)  # (P*P,)
                    assert (dist < 60).mean() >= 0.12, (idx, k, obj)
            bg = np.flatnonzero(s.patch_labels == -1)
            grey = np.linalg.norm(grid[bg].astype(float) - BG_LEVEL, axis=2) < 60  # (n_bg, P*P)
            assert grey.mean() > 0.85


def test_target_objects_match_question() -> None:
    for s in make_split("validation", 100):
        for k in s.target_objects:
            obj = s.objects[k]
            if s.template == "color":
                assert obj.shape in s.question and s.answer == obj.color
            if s.template == "shape":
                assert obj.color in s.question and s.answer == obj.shape


def test_count_not_predictable_from_coloured_area() -> None:
    area, count = [], []
    for idx in range(600):
        scene = render_scene(scene_rng("train", idx))
        area.append(float((scene.object_map >= 0).sum()))
        count.append(len(scene.objects))
    area_a, count_a = np.array(area), np.array(count)
    r = np.corrcoef(area_a, count_a)[0, 1]
    assert abs(r) < 0.35, r
    # best linear fit of count from area explains little of its variance
    coef = np.polyfit(area_a, count_a, 1)
    resid = count_a - np.polyval(coef, area_a)
    r2 = 1 - resid.var() / count_a.var()
    assert r2 < 0.12, r2
    # every count occurs with broadly overlapping area ranges
    for c in range(1, 5):
        sel = area_a[count_a == c]
        assert sel.min() < 650 and sel.max() > 950, (c, sel.min(), sel.max())
    # the best area-bin -> count lookup (10 quantile bins, fit on the data itself) stays near chance (0.25)
    edges = np.quantile(area_a, np.linspace(0, 1, 11)[1:-1])
    bins = np.digitize(area_a, edges)
    hits = sum(np.bincount(count_a[bins == k]).max() for k in np.unique(bins))
    assert hits / len(count_a) < 0.40, hits / len(count_a)


# ---------------------------------------------------------------- processor / batching
def test_processor_expands_image_tokens() -> None:
    proc = build_processor()
    s = make_split("test", 2)
    out = proc(images=[x.image for x in s], text=[build_prompt(x.question) for x in s], return_tensors="pt", padding=True)
    assert out["pixel_values"].shape == (2, 3, 64, 64)
    img_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert ((out["input_ids"] == img_id).sum(1) == NUM_IMAGE_TOKENS).all()
    assert proc.tokenizer.unk_token_id not in out["input_ids"].tolist()[0]


def test_batcher_matches_processor() -> None:
    proc = build_processor()
    batcher = TrainBatcher(turns=1, split="test")
    batch = batcher.batch([3])
    s = [x for x in scene_samples("test", 3)]
    text = build_prompt(s[0].question)
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    # the batch's first turn is one of this scene's questions: find it
    prompts = [proc(images=[s[0].image], text=[build_prompt(x.question) + f" {x.answer} </s>"], return_tensors="pt")
               for x in scene_samples("test", 3)]
    assert any(p["input_ids"][0].tolist() == ids for p in prompts), text
    ref = proc(images=[s[0].image], text=[text], return_tensors="pt")["pixel_values"]
    assert torch.allclose(batch["pixel_values"], ref, atol=1e-5)
    labels = batch["labels"][0]
    assert (labels != -100).sum() == 2  # answer word + </s>


def test_batcher_question_tensors_match_the_turns() -> None:
    batcher = TrainBatcher(turns=4, split="train")
    batch = batcher.batch([5, 6])
    inv = {i: w for w, i in batcher.vocab.items()}
    b, r, length = batch["question_ids"].shape
    assert (b, r) == (2, 4) and batch["question_targets"].shape == (2, 4, N_PATCHES)
    for row in range(2):
        text = " ".join(inv[i] for i in batch["input_ids"][row].tolist())
        scene = render_scene(scene_rng("train", [5, 6][row]))
        for turn in range(4):
            words = [inv[i] for i in batch["question_ids"][row, turn][batch["question_mask"][row, turn]].tolist()]
            question = " ".join(words)
            assert f"{question} ASSISTANT:" in text  # the turn really is in the sequence
            covered = batch["question_targets"][row, turn].numpy()
            if question.startswith("how many"):  # count: every object is a target
                assert np.array_equal(covered, scene.patch_labels >= 0)
            elif covered.any():  # the covered patches belong to objects named by the question
                ids = set(scene.patch_labels[covered].tolist())
                named = {k for k, o in enumerate(scene.objects) if o.color in words or o.shape in words}
                assert ids <= named


def test_prompt_relevance_loss_matches_a_direct_computation() -> None:
    from vtprune.experiments.organism.train import prompt_relevance_loss

    g = torch.Generator().manual_seed(0)
    proj = torch.randn(2, 5, 8, generator=g)  # (B, N, D)
    emb = torch.randn(7, 8, generator=g)  # (V, D)
    ids = torch.tensor([[[1, 2, 0], [3, 0, 0]], [[4, 5, 6], [2, 2, 0]]])  # (B, R, L)
    mask = torch.tensor([[[1, 1, 0], [1, 0, 0]], [[1, 1, 1], [1, 1, 0]]], dtype=torch.bool)
    targets = torch.zeros(2, 2, 5, dtype=torch.bool)
    targets[0, 0, [1, 3]] = True
    targets[1, 1, 4] = True  # question (0, 1) and (1, 0) have no target: ignored
    expected = []
    for b, r in [(0, 0), (1, 1)]:
        q = emb[ids[b, r][mask[b, r]]].mean(0)
        cos = torch.nn.functional.cosine_similarity(proj[b], q.expand_as(proj[b]), dim=-1) / 0.1
        expected.append(torch.logsumexp(cos, 0) - torch.logsumexp(cos[targets[b, r]], 0))
    got = prompt_relevance_loss(proj, ids, mask, targets, emb, tau=0.1)
    assert torch.allclose(got, torch.stack(expected).mean(), atol=1e-5)
    assert prompt_relevance_loss(proj, ids, mask, torch.zeros_like(targets), emb, 0.1) == 0


# ---------------------------------------------------------------- training smoke test
def test_training_runs_end_to_end(tmp_path: Path) -> None:
    from vtprune.experiments.organism.model import ModelSpec
    from vtprune.experiments.organism.train import TrainConfig, train

    cfg = TrainConfig(out=str(tmp_path / "run"), steps=4, batch_size=4, turns=2, warmup=2, ckpt_every=2,
                      eval_every=4, n_val=8, n_test=16,
                      spec=ModelSpec(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1))
    weights = train(cfg)
    metrics = json.loads((weights / "metrics.json").read_text())
    assert metrics["steps"] == 4 and "auc_mean" in metrics and "overall" in metrics["accuracy"]
    assert (weights / "model.safetensors").exists() and (tmp_path / "run" / "checkpoint.pt").exists()
    # resuming a finished run is a no-op that exports again
    assert train(cfg) == weights


def test_training_is_deterministic(tmp_path: Path) -> None:
    """Two runs of the same config give bit-identical weights (the shipped ones are reproducible)."""
    from safetensors.torch import load_file

    from vtprune.experiments.organism.model import ModelSpec
    from vtprune.experiments.organism.train import TrainConfig, train

    spec = ModelSpec(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1)
    tensors = []
    for run in ("a", "b"):
        cfg = TrainConfig(out=str(tmp_path / run), steps=3, batch_size=4, turns=2, warmup=1, ckpt_every=3,
                          eval_every=3, n_val=8, n_test=8, spec=spec)
        tensors.append(load_file(str(train(cfg) / "model.safetensors")))
    assert tensors[0].keys() == tensors[1].keys()
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])


def test_shipped_weights_come_from_the_default_command() -> None:
    """metrics.json records the config: every hyper-parameter but the output folder is the default of
    ``vtprune organism train``, so ``vtprune organism train --out DIR`` reproduces the shipped weights."""
    weights = _shipped()
    from dataclasses import asdict

    from vtprune.experiments.organism.train import parse_args

    recorded = json.loads((weights / "metrics.json").read_text())["config"]
    default = asdict(parse_args(["--out", recorded["out"]]))
    # ``task`` / ``init`` were added later (issue 18, the clutter task): their defaults are the shapes task trained
    # from a fresh seeded init, what the shipped run did; every other recorded key equals the default
    assert (default.pop("task"), default.pop("init")) == ("shapes", "")
    assert recorded == default


# ---------------------------------------------------------------- shipped organism
def _shipped() -> Path:
    if not (WEIGHTS_DIR / "model.safetensors").exists():
        pytest.skip("organism weights not shipped yet")
    return WEIGHTS_DIR


def test_shipped_organism_accuracy() -> None:
    _shipped()
    from vtprune.experiments.organism import load_organism
    from vtprune.experiments.organism.evaluate import accuracy_by_template, answer

    model, processor = load_organism()
    samples = make_split("test", 200)
    acc = accuracy_by_template(samples, answer(model, processor, samples))
    assert all(v >= 0.95 for v in acc.values()), acc


def test_shipped_metrics_and_size() -> None:
    weights = _shipped()
    metrics = json.loads((weights / "metrics.json").read_text())
    assert metrics["auc_max"] >= 0.9
    assert all(v >= 0.95 for v in metrics["accuracy"].values())
    assert sum(f.stat().st_size for f in weights.iterdir()) < 10 * 2**20


def test_batched_generation_matches_single() -> None:
    _shipped()
    from vtprune.experiments.organism import load_organism
    from vtprune.experiments.organism.evaluate import answer

    model, processor = load_organism()
    samples = make_split("test", 12)
    batched = answer(model, processor, samples, batch_size=12)
    single = [answer(model, processor, [s])[0] for s in samples]
    assert batched == single


def test_shipped_mean_pooled_relevance_target() -> None:
    """Prompt relevance (mean-pooled, as ZSPAPrune scores) finds the question's object: AUC >= 0.9."""
    weights = _shipped()
    metrics = json.loads((weights / "metrics.json").read_text())
    assert metrics["auc_mean"] >= 0.9 and metrics["auc_max"] >= 0.9
    from vtprune.experiments.organism import load_organism
    from vtprune.experiments.organism.evaluate import prompt_relevance, relevance_auc

    model, processor = load_organism()
    samples = make_split("test", 200)
    rel = prompt_relevance(model, processor, samples)
    assert relevance_auc(samples, rel["mean"]) >= 0.9
