"""Training batches for the video organism (multi-turn sequences about one video each).

Contract
--------
``VideoTrainBatcher(turns).batch(indices)`` renders the train-split videos ``indices`` (``video_task``) and
returns what ``build_video_processor()`` gives for the same text (the tests check it), built from token ids:

* ``input_ids`` / ``attention_mask`` / ``labels`` (B, T), right padded with ``<pad>``; sequence =
  ``<s> USER: <|vision_start|> <|video_pad|>*144 <|vision_end|> q1 ASSISTANT: a1 </s> USER: q2 ASSISTANT: a2 </s>
  ...`` (the video's ``turns`` questions, shuffled by the video's generator); labels: every answer and its ``</s>``;
* ``mm_token_type_ids`` (B, T): 2 at the ``<|video_pad|>`` positions (what the processor returns);
* ``pixel_values_videos`` / ``video_grid_thw``: ``qwen_video.OrganismVideoProcessor`` of the frames;
* ``mover_tokens`` (B, VIDEO_TOKENS) float: 1 where the merged token covers the moving object (the training-only
  motion probe of ``video_train``);
* ``patch_pos`` (B, VIDEO_TOKENS, 4) word ids each merged token is aligned with (``train.alignment_loss``): as the
  image organism's (colour, shape, "shapes"; background: "background"), plus "moving" on the mover's tokens (the
  generic "shapes" again on the other tokens), so the LLM can find the mover as it finds a named shape.
"""

from __future__ import annotations

import numpy as np
import torch

from .batching import right_pad
from .task import BACKGROUND_WORD, OBJECT_WORD
from .qwen_processor import VIDEO_PAD, VISION_END, VISION_START, build_qwen_image_processor
from .qwen_video import OrganismVideoProcessor, build_video_tokenizer
from .video_task import VIDEO_TOKENS, VIDEO_WORDS, Video, render_video, video_questions, video_rng

__all__ = ["VideoTrainBatcher"]


class VideoTrainBatcher:
    """Multi-turn training batches of videos of one split."""

    def __init__(self, turns: int = 4, split: str = "train") -> None:
        self.turns, self.split = turns, split
        self.vocab: dict[str, int] = build_video_tokenizer().get_vocab()
        self.video_processor = OrganismVideoProcessor(build_qwen_image_processor())

    def _ids(self, text: str) -> list[int]:
        return [self.vocab[w] for w in text.split()]

    def _sequence(self, qas: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        v = self.vocab
        ids = [v["<s>"], v["USER:"], v[VISION_START]] + [v[VIDEO_PAD]] * VIDEO_TOKENS + [v[VISION_END]]
        labels = [-100] * len(ids)
        for turn, (q, a) in enumerate(qas):
            prefix = ([] if turn == 0 else [v["USER:"]]) + self._ids(q) + [v["ASSISTANT:"]]
            target = [v[a], v["</s>"]]
            ids += prefix + target
            labels += [-100] * len(prefix) + target
        return ids, labels

    def _positives(self, video: Video) -> np.ndarray:
        """(VIDEO_TOKENS, 4) word ids each merged token is pulled toward."""
        v = self.vocab
        pos = np.full((VIDEO_TOKENS, 4), v[BACKGROUND_WORD], dtype=np.int64)  # (N, 4)
        for k, obj in enumerate(video.objects):
            last = v[VIDEO_WORDS[0]] if k == video.mover else v[OBJECT_WORD]
            pos[video.patch_labels == k] = [v[obj.color], v[obj.shape], v[OBJECT_WORD], last]
        return pos

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Batch of videos ``indices`` of the split (deterministic in the indices)."""
        seqs, labs, clips, movers, poss = [], [], [], [], []
        for idx in indices:
            rng = video_rng(self.split, idx)
            video = render_video(rng)
            qas: list[tuple[str, str]] = []
            while len(qas) < self.turns:
                qas += [(q, a) for _, q, a, _ in video_questions(video, rng)]
            order = rng.permutation(len(qas))[: self.turns]
            ids, lab = self._sequence([qas[i] for i in order])
            seqs.append(ids)
            labs.append(lab)
            clips.append(video.frames)
            movers.append(video.patch_labels == video.mover)
            poss.append(self._positives(video))
        input_ids, labels, mask = right_pad(seqs, labs, self.vocab["<pad>"])  # (B, T) each
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": labels,
            "mm_token_type_ids": 2 * (input_ids == self.vocab[VIDEO_PAD]).long(),  # (B, T)
            **dict(self.video_processor(clips)),
            "mover_tokens": torch.from_numpy(np.stack(movers)).float(),  # (B, VIDEO_TOKENS)
            "patch_pos": torch.from_numpy(np.stack(poss)),  # (B, VIDEO_TOKENS, 4)
        }
