"""The ``all`` probe of issue 18 (``experiments/organism/group_all.py``; measured, not shipped).

Scenes and questions are checked against their contract (group size, one odd member exactly on "no",
balance, determinism, disjoint streams), the vocabulary extension (no existing id moves; the grown
model's new row), the training batches (the new word is encoded, group slots), and the clutter scenes
are unchanged by the rendering helper the probe shares with them.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest
import torch

from vtprune.experiments.organism.batching import TrainBatcher
from vtprune.experiments.organism.clutter import CLUTTER_OBJECTS, make_clutter_split
from vtprune.experiments.organism.group_all import (
    GROUP_SIZE,
    GROUP_SLOTS,
    GROUP_WORDS,
    INIT_FROM,
    GroupBatcher,
    build_group_processor,
    group_rng,
    group_training_scene,
    grow_vocabulary,
    make_group_split,
    make_whole_split,
)
from vtprune.experiments.organism.processor import build_tokenizer
from vtprune.experiments.organism.task import COLORS, N_PATCHES, SHAPES


def test_group_scene_contract() -> None:
    samples = make_group_split("validation", 80)
    assert Counter(s.answer for s in samples) == {"yes": 40, "no": 40}
    for i, s in enumerate(samples):
        n, objs = len(s.objects), s.objects
        color, shape = s.question.split()[3], s.question.split()[5]
        assert s.question == f"are all the {color} shapes {shape} ?" and s.template == "all"
        assert color in COLORS and shape in SHAPES and CLUTTER_OBJECTS[0] <= n <= CLUTTER_OBJECTS[1]
        group = [k for k, o in enumerate(objs) if o.color == color]
        assert s.target_objects == group == list(range(len(group)))
        assert GROUP_SIZE[0] <= len(group) <= GROUP_SIZE[1]
        odd = [k for k in group if objs[k].shape != shape]
        assert len(odd) == (0 if i % 2 == 0 else 1) and s.answer == ("yes" if not odd else "no")
        counts = Counter(s.patch_labels[s.patch_labels >= 0].tolist())
        assert s.patch_labels.shape == (N_PATCHES,) and all(counts[k] == 1 for k in range(n))  # one token each


def test_group_is_deterministic_with_its_own_stream() -> None:
    a, b = make_group_split("test", 3)[2], make_group_split("test", 3)[2]
    assert a.question == b.question and np.array_equal(a.image, b.image)
    assert not np.array_equal(make_group_split("validation", 3)[2].image, a.image)
    assert not np.array_equal(group_rng("test", 2).random(4), np.random.default_rng([20_000_002, 1]).random(4))
    with pytest.raises(KeyError, match="validation"):
        group_rng("dev", 0)


def test_whole_split_keeps_the_clutter_samples() -> None:
    whole = make_whole_split("validation", 12)
    clutter = make_clutter_split("validation", 9)
    assert [s.question for s in whole[:9]] == [s.question for s in clutter]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(whole, clutter))
    assert [s.template for s in whole[9:]] == ["all"] * 3


def test_clutter_rendering_unchanged() -> None:
    # sha256 of this clutter image computed on the tree before ``render_one_token_objects`` was split out of
    # ``render_clutter_scene`` (the helper makes the same generator calls in the same order)
    digest = hashlib.sha256(make_clutter_split("validation", 6)[4].image.tobytes()).hexdigest()
    assert digest == "bd437ea8a6024d0e2a5f53b61fbc02092a40a60c49bb90c7f732b1182a13c67f"


def test_vocabulary_extension_moves_no_id() -> None:
    old, new = build_tokenizer().get_vocab(), build_tokenizer(extra_words=GROUP_WORDS).get_vocab()
    assert all(new[w] == i for w, i in old.items())
    assert sorted(new[w] for w in GROUP_WORDS) == list(range(len(old), len(new)))
    tok = build_group_processor().tokenizer
    ids = tok("are all the red shapes circle ?", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and new["all"] in ids


def test_grow_vocabulary_copies_the_init_row() -> None:
    from vtprune.experiments.organism import WEIGHTS_DIR
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(WEIGHTS_DIR.parent / "weights_clutter", dtype=torch.float32)
    before = model.get_input_embeddings().weight.detach().clone()  # (V, D)
    assert grow_vocabulary(model) == list(GROUP_WORDS)
    after = model.get_input_embeddings().weight  # (V + 1, D)
    vocab = build_tokenizer(extra_words=GROUP_WORDS).get_vocab()
    assert after.shape[0] == len(vocab) and torch.equal(after[: before.shape[0]], before)
    assert torch.equal(after[vocab["all"]], before[vocab[INIT_FROM]])
    assert model.get_output_embeddings().weight.shape[0] == len(vocab)  # tied head grew too
    assert grow_vocabulary(model) == []  # idempotent


def test_group_batches() -> None:
    batcher = GroupBatcher(turns=4)
    batch = batcher.batch(list(range(12)))
    assert batch["input_ids"].max() < len(batcher.vocab) and (batch["input_ids"] == batcher.vocab["all"]).any()
    plain = TrainBatcher(turns=4, task="mixed").batch([1, 3, 4])  # non-group slots match the mixed batches
    mine = batcher.batch([1, 3, 4])
    assert all(torch.equal(plain[k], mine[k]) for k in plain)
    scene, questions, _ = group_training_scene("train", GROUP_SLOTS[0])
    assert questions[0][0] == "all" and [t for t, *_ in questions[1:]] == ["exists"] * len(SHAPES)
    color = questions[0][1].split()[3]
    for _, q, a, targets in questions[1:]:
        s = q.split()[4]
        members = [k for k, o in enumerate(scene.objects) if (o.color, o.shape) == (color, s)]
        assert targets == members and a == ("yes" if members else "no")


@pytest.mark.slow  # loads the clutter organism and runs the split oracle on 12 questions
def test_curves_machinery_on_the_grown_clutter_weights() -> None:
    from transformers import LlavaForConditionalGeneration

    from vtprune.experiments.organism import WEIGHTS_DIR
    from vtprune.experiments.organism.group_all_train import curves

    model = LlavaForConditionalGeneration.from_pretrained(WEIGHTS_DIR.parent / "weights_clutter", dtype=torch.float32).eval()
    grow_vocabulary(model)  # "all" untrained here: this checks the bookkeeping, not the accuracy
    samples = make_whole_split("validation", 12)
    cur = curves(model, build_group_processor(), samples, budget=2)
    assert cur["correct"].shape == (12, 3) and cur["auto_counts"].sum() == 12
    assert set(cur["per_template"]) == {"shape", "color", "exists", "all"}
    for t, acc in cur["per_template"].items():
        rows = np.array([s.template == t for s in samples])
        assert np.allclose(acc, cur["correct"][rows].mean(axis=0))
    assert cur["rows"]["critical 0.0"] == pytest.approx(cur["per_critical"][0])
    assert cur["rows"]["critical 1.0"] == pytest.approx(cur["per_critical"][2])


@pytest.mark.slow  # loads the clutter organism, prunes 8 group questions twice and scores them
def test_group_coverage_and_ranks_bookkeeping() -> None:
    from transformers import LlavaForConditionalGeneration

    from vtprune.experiments.organism import WEIGHTS_DIR
    from vtprune.experiments.organism.group_all_train import group_coverage, group_ranks
    from vtprune.experiments.organism.task import N_PATCHES

    model = LlavaForConditionalGeneration.from_pretrained(WEIGHTS_DIR.parent / "weights_clutter", dtype=torch.float32).eval()
    grow_vocabulary(model)
    processor = build_group_processor()
    samples = make_group_split("validation", 8)
    full = group_coverage(model, processor, samples, budget=N_PATCHES, critical=0)  # keeps every token
    assert full["odd kept"] == 1.0 and full["group kept"] == 1.0
    one = group_coverage(model, processor, samples, budget=1, critical=1)  # the single most relevant token
    sizes = np.array([len(np.flatnonzero(np.isin(s.patch_labels, s.target_objects))) for s in samples])
    ranks = group_ranks(model, processor, samples)
    assert (ranks["cover"] >= sizes).all() and len(ranks["odd"]) == 4 and (ranks["odd"] >= 1).all()
    assert one["group kept"] <= 1.0 / sizes.min() + 1e-9  # one kept token covers at most one group token
    assert one["odd kept"] == pytest.approx(np.mean(ranks["odd"] == 1))
