"""``vtprune organism train``: train either shipped organism (``--family llava``, the default, or ``qwen2_vl``).

Contract
--------
* ``parse_args(argv)`` -> ``train.TrainConfig`` for ``--family llava`` (exactly ``train.parse_args``, so the
  default command still reproduces the shipped LLaVA organism) or ``qwen_train.QwenTrainConfig`` for
  ``--family qwen2_vl`` (same options, the Qwen2-VL organism's defaults).
* ``--family qwen2_vl --task video`` -> ``video_train.VideoTrainConfig``: the video organism, fine-tuned from the
  shipped Qwen2-VL organism on the video task (``video_task``; docs/demo.md), its own defaults, plus
  ``--image-batch-size`` / ``--image-weight`` / ``--motion-weight``. ``--task`` is refused for the other families.
* ``train_any(config)`` trains the organism the config describes; ``main(argv)`` prints the weights folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import train as llava_train
from .qwen_model import QwenSpec
from .qwen_train import QWEN_FAMILY, QwenTrainConfig, train_qwen
from .video_train import VIDEO_TASK, VideoTrainConfig, train_video

__all__ = ["FAMILIES", "QWEN_TASKS", "main", "parse_args", "train_any"]

FAMILIES: tuple[str, ...] = ("llava", QWEN_FAMILY)  # the first is the default
QWEN_TASKS: tuple[str, ...] = ("shapes", VIDEO_TASK)  # --task of --family qwen2_vl; the first is the default

# options of both families: (flag, TrainConfig field, type)
_OPTIONS = (
    ("--steps", "steps", int), ("--seed", "seed", int), ("--batch-size", "batch_size", int), ("--lr", "lr", float),
    ("--turns", "turns", int), ("--aux-weight", "aux_weight", float), ("--prompt-weight", "prompt_weight", float),
    ("--n-test", "n_test", int), ("--n-val", "n_val", int), ("--eval-every", "eval_every", int),
    ("--ckpt-every", "ckpt_every", int), ("--threads", "threads", int), ("--workers", "workers", int),
)
_SPEC_OPTIONS = (
    ("--vision-hidden", "vision_hidden"), ("--vision-layers", "vision_layers"),
    ("--text-hidden", "text_hidden"), ("--text-layers", "text_layers"),
)


def _family(argv: list[str] | None) -> tuple[str, list[str] | None]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--family", choices=FAMILIES, default=FAMILIES[0],
                     help="llava: the LLaVA organism (default); qwen2_vl: the Qwen2-VL organism (docs/demo.md)")
    known, rest = pre.parse_known_args(argv)
    return known.family, rest


def _parse_video(argv: list[str]) -> VideoTrainConfig:
    ap = argparse.ArgumentParser(prog="vtprune organism train --family qwen2_vl --task video",
                                 description="Fine-tune the Qwen2-VL organism on the video task (weights_video).")
    ap.add_argument("--out", required=True, help="run directory (checkpoints, log, weights/)")
    d = VideoTrainConfig(out="")
    extra = (("--image-batch-size", "image_batch_size", int), ("--image-weight", "image_weight", float),
             ("--motion-weight", "motion_weight", float), ("--init", "init", str))
    for flag, name, kind in _OPTIONS + extra:
        ap.add_argument(flag, type=kind, default=getattr(d, name))
    a = vars(ap.parse_args(argv))
    return VideoTrainConfig(out=a["out"], **{name: a[name] for _, name, _ in _OPTIONS + extra})


def _parse_qwen(argv: list[str]) -> QwenTrainConfig:
    ap = argparse.ArgumentParser(prog="vtprune organism train --family qwen2_vl",
                                 description="Train the Qwen2-VL model organism.")
    ap.add_argument("--out", required=True, help="run directory (checkpoints, log, weights/)")
    d, s = QwenTrainConfig(out=""), QwenSpec()
    for flag, name, kind in _OPTIONS:
        ap.add_argument(flag, type=kind, default=getattr(d, name))
    for flag, name in _SPEC_OPTIONS:
        ap.add_argument(flag, type=int, default=getattr(s, name))
    a = vars(ap.parse_args(argv))
    spec = QwenSpec(**{**s.to_dict(), **{name: a[name] for _, name in _SPEC_OPTIONS}})
    return QwenTrainConfig(out=a["out"], spec=spec, **{name: a[name] for _, name, _ in _OPTIONS})


def parse_args(argv: list[str] | None) -> llava_train.TrainConfig:
    """CLI arguments -> the config of the chosen family (see the module docstring)."""
    family, rest = _family(argv)
    if family == FAMILIES[0]:
        return llava_train.parse_args(rest)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", choices=QWEN_TASKS, default=QWEN_TASKS[0],
                     help="shapes: the Qwen2-VL organism (default); video: the video organism (docs/demo.md)")
    known, rest = pre.parse_known_args(rest or [])
    return _parse_video(rest) if known.task == VIDEO_TASK else _parse_qwen(rest)


def train_any(config: llava_train.TrainConfig) -> Path:
    """Train (or resume) the organism ``config`` describes; returns its weights folder."""
    if isinstance(config, VideoTrainConfig):
        return train_video(config)
    if isinstance(config, QwenTrainConfig):
        return train_qwen(config)
    return llava_train.train(config)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints the weights directory."""
    print(train_any(parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
