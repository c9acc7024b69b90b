"""Fast training batches for the organism (multi-turn sequences built from token ids).

Contract
--------
``TrainBatcher(turns, task=...).batch(indices)`` renders the train-split scenes ``indices``
(``task``: ``"shapes"`` the original task, ``"clutter"`` (``clutter.py``), or ``"mixed"``:
clutter scenes at even, shapes scenes at odd indices) and
returns a dict of tensors equivalent to what ``build_processor()`` would produce for
the same text (checked by the tests), without going through PIL, for speed:

* ``input_ids`` / ``attention_mask`` (B, T), right padded with ``<pad>``;
  sequence = ``<s> USER: <image>*64 q1 ASSISTANT: a1 </s> USER: q2 ASSISTANT: a2 </s> ...``
* ``labels`` (B, T): the answer word and its ``</s>`` of every turn, -100 elsewhere;
* ``pixel_values`` (B, 3, H, W): CLIP-normalised images;
* ``patch_pos`` (B, N, P) alignment targets for the auxiliary loss: for every patch the
  word ids it should align with (object: colour word, shape word, generic "shapes";
  background: "background" repeated), see ``train.alignment_loss``;
* ``question_ids`` (B, R, L) the word ids of each turn's question (``<pad>`` after the
  end), ``question_mask`` (B, R, L) bool, and ``question_targets`` (B, R, N) bool: the
  patches covering the objects that turn's question is about (all False for a "no"
  answer of ``exists``), for ``train.prompt_relevance_loss``.

``right_pad(seqs, labs, pad)`` pads token sequences and their labels into those (B, T) tensors (also used by
``video_batching``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .processor import IMAGE_TOKEN, NUM_IMAGE_TOKENS, build_image_processor, build_tokenizer
from .clutter import clutter_rng, clutter_training_scene
from .task import BACKGROUND_WORD, OBJECT_WORD, Scene, make_questions, render_scene, scene_rng

BATCH_TASKS: tuple[str, ...] = ("shapes", "clutter", "mixed")

N_POSITIVES = 3


def right_pad(seqs: list[list[int]], labs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, attention_mask), each (B, T) long, of token sequences and their labels right padded to
    the longest (ids with ``pad``, labels with -100, mask 0)."""
    t_max = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), t_max), pad, dtype=torch.long)  # (B, T)
    labels = torch.full((len(seqs), t_max), -100, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), t_max), dtype=torch.long)  # (B, T)
    for b, (s, lab) in enumerate(zip(seqs, labs)):
        input_ids[b, : len(s)] = torch.tensor(s)
        labels[b, : len(lab)] = torch.tensor(lab)
        mask[b, : len(s)] = 1
    return input_ids, labels, mask


class TrainBatcher:
    """Builds multi-turn training batches from train-split scene indices."""

    def __init__(self, turns: int = 4, split: str = "train", task: str = "shapes") -> None:
        if task not in BATCH_TASKS:
            raise ValueError(f"unknown organism task {task!r}; expected one of {list(BATCH_TASKS)}")
        self.turns = turns
        self.split = split
        self.task = task
        tok = build_tokenizer()
        self.vocab: dict[str, int] = tok.get_vocab()
        self.pad = self.vocab["<pad>"]
        ip = build_image_processor()
        self.mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)  # (1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)  # (1, 3, 1, 1)

    def _ids(self, text: str) -> list[int]:
        return [self.vocab[w] for w in text.split()]

    def _sequence(self, qas: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """Token ids and labels of one multi-turn conversation."""
        ids = [self.vocab["<s>"], self.vocab["USER:"]] + self._image_ids()
        labels = [-100] * len(ids)
        for turn, (q, a) in enumerate(qas):
            prefix = ([] if turn == 0 else [self.vocab["USER:"]]) + self._ids(q) + [self.vocab["ASSISTANT:"]]
            ids += prefix
            labels += [-100] * len(prefix)
            target = [self.vocab[a], self.vocab["</s>"]]
            ids += target
            labels += target
        return ids, labels

    def _image_ids(self) -> list[int]:
        """Token ids standing for the image in the sequence (family-specific; LLaVA: 64 ``<image>``)."""
        return [self.vocab[IMAGE_TOKEN]] * NUM_IMAGE_TOKENS

    def _pixels(self, images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """Model image inputs for the rendered scenes (family-specific; LLaVA: ``pixel_values`` (B, 3, H, W))."""
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
        return {"pixel_values": (pixels - self.mean) / self.std}  # (B, 3, H, W)

    def _positives(self, scene_objects: list, patch_labels: np.ndarray) -> np.ndarray:
        """(N, P) word ids each patch is pulled toward."""
        bg = self.vocab[BACKGROUND_WORD]
        pos = np.full((len(patch_labels), N_POSITIVES), bg, dtype=np.int64)  # (N, P)
        for k, obj in enumerate(scene_objects):
            sel = patch_labels == k
            pos[sel] = [self.vocab[obj.color], self.vocab[obj.shape], self.vocab[OBJECT_WORD]]
        return pos

    def _scene(self, idx: int) -> tuple[Scene, Callable[[], list], np.random.Generator]:
        """(scene, maker of its questions, generator ordering the turns) of scene ``idx``.

        ``mixed`` takes the clutter scene for even and the shapes scene for odd indices.
        """
        if self.task == "clutter" or (self.task == "mixed" and idx % 2 == 0):
            scene, qs = clutter_training_scene(self.split, idx)
            rng = clutter_rng(self.split, idx)
            return scene, lambda: list(qs), rng
        rng = scene_rng(self.split, idx)
        scene = render_scene(rng)
        return scene, lambda: make_questions(scene, rng), rng

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Batch for scenes ``indices`` of the split (deterministic in the indices)."""
        seqs, labs, imgs, poss = [], [], [], []
        questions: list[list[list[int]]] = []
        covered: list[list[np.ndarray]] = []
        for idx in indices:
            scene, questions_of, rng = self._scene(idx)
            qas: list[tuple[str, str]] = []
            targets: list[list[int]] = []
            while len(qas) < self.turns:
                qs = questions_of()
                qas += [(q, a) for _, q, a, _ in qs]
                targets += [t for _, _, _, t in qs]
            order = rng.permutation(len(qas))[: self.turns]
            ids, lab = self._sequence([qas[i] for i in order])
            questions.append([self._ids(qas[i][0]) for i in order])
            covered.append([np.isin(scene.patch_labels, targets[i]) for i in order])
            seqs.append(ids)
            labs.append(lab)
            imgs.append(scene.image)
            poss.append(self._positives(scene.objects, scene.patch_labels))
        input_ids, labels, mask = right_pad(seqs, labs, self.pad)  # (B, T) each
        patch_pos = torch.from_numpy(np.stack(poss))  # (B, N, P)
        q_len = max(len(q) for row in questions for q in row)
        question_ids = torch.full((len(seqs), self.turns, q_len), self.pad, dtype=torch.long)  # (B, R, L)
        question_mask = torch.zeros((len(seqs), self.turns, q_len), dtype=torch.bool)  # (B, R, L)
        for b, row in enumerate(questions):
            for r, q in enumerate(row):
                question_ids[b, r, : len(q)] = torch.tensor(q)
                question_mask[b, r, : len(q)] = True
        question_targets = torch.from_numpy(np.stack([np.stack(row) for row in covered]))  # (B, R, N)
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": labels,
            **self._pixels(imgs),
            "patch_pos": patch_pos,
            "question_ids": question_ids,
            "question_mask": question_mask,
            "question_targets": question_targets,
        }
