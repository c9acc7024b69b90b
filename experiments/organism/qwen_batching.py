"""Training batches for the Qwen2-VL organism (``batching.TrainBatcher`` with Qwen2-VL image inputs).

Contract
--------
``QwenTrainBatcher(turns).batch(indices)`` returns what ``TrainBatcher`` returns (same scenes, turns,
labels, alignment targets and question tensors for the same indices), except that

* the image in the sequence is ``<|vision_start|> <|image_pad|>*64 <|vision_end|>`` (ids of
  ``qwen_processor.qwen_vocabulary``), and ``mm_token_type_ids`` (B, T) marks the ``<|image_pad|>``
  positions with 1 (what ``Qwen2VLProcessor`` returns; Qwen2-VL computes its M-RoPE ids from it);
* ``pixel_values`` (B * 256, 1176) and ``image_grid_thw`` (B, 3) come from the real image processor
  (``build_qwen_image_processor``), so training sees exactly the evaluation inputs;
* ``teacher_pixel_values`` (B, 3, 64, 64): the LLaVA organism's inputs for the same scenes (the distillation
  teacher of ``qwen_train``).
"""

from __future__ import annotations

import numpy as np
import torch

from .batching import TrainBatcher
from .qwen_processor import IMAGE_PAD, QWEN_IMAGE_TOKENS, VISION_END, VISION_START, build_qwen_image_processor, build_qwen_tokenizer

__all__ = ["QwenTrainBatcher"]


class QwenTrainBatcher(TrainBatcher):
    """Multi-turn training batches for the Qwen2-VL organism."""

    def __init__(self, turns: int = 4, split: str = "train") -> None:
        super().__init__(turns=turns, split=split)
        self.vocab = build_qwen_tokenizer().get_vocab()
        self.image_processor = build_qwen_image_processor()

    def _image_ids(self) -> list[int]:
        return [self.vocab[VISION_START]] + [self.vocab[IMAGE_PAD]] * QWEN_IMAGE_TOKENS + [self.vocab[VISION_END]]

    def _pixels(self, images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        out = self.image_processor(images=list(images), return_tensors="pt")
        teacher = super()._pixels(images)["pixel_values"]  # (B, 3, H, W)
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"],
                "teacher_pixel_values": teacher}

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """As ``TrainBatcher.batch`` plus ``mm_token_type_ids`` (B, T)."""
        out = super().batch(indices)
        out["mm_token_type_ids"] = (out["input_ids"] == self.vocab[IMAGE_PAD]).long()  # (B, T)
        return out
