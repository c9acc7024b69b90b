"""Training of the video organism (``vtprune organism train --family qwen2_vl --task video``).

Contract
--------
* Starts from the shipped Qwen2-VL organism (``QWEN_WEIGHTS_DIR``): its embeddings grow by
  ``video_task.VIDEO_WORDS`` (appended; each new row starts as the embedding of ``_INIT_FROM`` = "shape",
  the word "moving" qualifies), every other weight is kept.
* Each step: the LM loss on the answers of ``batch_size`` train videos (``VideoTrainBatcher``, ``turns``
  questions each) + ``image_weight`` x the LM loss on ``image_batch_size`` train scenes of the shapes task
  (``QwenTrainBatcher``; keeps the image skills) + ``motion_weight`` x a training-only motion probe: a linear
  logistic head (zero-initialised) on the layer-normalised merged visual tokens (the output of
  ``model.model.visual.merger``) that predicts which
  tokens cover the moving object (dense supervision for the vision tower's temporal patch; the head is not
  saved) + ``aux_weight`` x ``train.alignment_loss`` of those tokens with the word ids of
  ``VideoTrainBatcher``'s ``patch_pos`` (the image organism's alignment, plus "moving" on the mover's tokens). AdamW, ``train.lr_at`` schedule, deterministic given the config (seeded, data a pure function of the
  step, deterministic algorithms); checkpoint every ``ckpt_every`` steps (a rerun resumes); log ``DIR/train.log``.
* At the end: fp16 weights + processor in ``DIR/weights`` (``qwen_video.QwenOrganismProcessor``), reloaded in
  fp32 with the checked loader and scored on ``n_test`` held-out test videos and ``n_test`` test images
  (``DIR/weights/metrics.json``; accuracy = first answer token by greedy decoding, i.e. the argmax).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from transformers import Qwen2VLForConditionalGeneration

from .evaluate import accuracy_by_template
from .loading import QWEN_WEIGHTS_DIR, load_qwen_organism
from .qwen_batching import QwenTrainBatcher
from .qwen_processor import build_qwen_prompt
from .qwen_video import QwenOrganismProcessor, build_video_processor, build_video_prompt, video_vocabulary
from .task import make_split
from .train import TrainConfig, alignment_loss, lr_at
from .training_run import (
    SCENE_RANGE, log, log_progress, optimiser_step, resume, run_metrics, save_checkpoint, save_weights, set_lr, start_run,
    step_loader, step_scenes, update_running,
)
from .video_batching import VideoTrainBatcher
from .video_task import VIDEO_TOKENS, VIDEO_WORDS, make_video_split

__all__ = ["VIDEO_TASK", "VideoTrainConfig", "argmax_answers", "train_video", "video_accuracy"]

VIDEO_TASK = "video"
_INIT_FROM = "shape"
_IMAGE_SCENE_OFFSET = SCENE_RANGE // 2 + 1  # image scenes from the upper half: apart from the image organism's
_IMAGE_TOKENS_KEYS = ("patch_pos", "question_ids", "question_mask", "question_targets", "teacher_pixel_values")


@dataclass
class VideoTrainConfig(TrainConfig):
    """Hyper-parameters of one video-organism run (defaults = the shipped ``weights_video``)."""

    steps: int = 1000
    batch_size: int = 8
    image_batch_size: int = 4
    lr: float = 1e-3
    warmup: int = 30
    eval_every: int = 200
    ckpt_every: int = 100
    n_val: int = 100
    n_test: int = 1000
    image_weight: float = 0.5
    motion_weight: float = 0.5
    threads: int = 1  # as train.TrainConfig: 1 is far faster than 2 on a shared 2-core box
    family: str = "qwen2_vl"
    task: str = VIDEO_TASK
    init: str = "shipped"  # "shipped" = the shipped Qwen2-VL organism (weights_qwen2_vl/), else a weights folder


class _StepBatches(torch.utils.data.Dataset):
    """Item ``step`` = (video batch, image batch) of that step, a pure function of it."""

    def __init__(self, config: VideoTrainConfig) -> None:
        self.config = config
        self.videos = VideoTrainBatcher(turns=config.turns)
        self.images = QwenTrainBatcher(turns=config.turns)

    def __len__(self) -> int:
        return self.config.steps

    def __getitem__(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        c = self.config
        video = self.videos.batch(step_scenes(c.seed, step, c.batch_size))
        image = self.images.batch(step_scenes(c.seed, step, c.image_batch_size, _IMAGE_SCENE_OFFSET))
        for key in _IMAGE_TOKENS_KEYS:
            image.pop(key)
        return video, image


@torch.no_grad()
def grow_vocabulary(model: Qwen2VLForConditionalGeneration) -> list[str]:
    """Append ``VIDEO_WORDS`` rows to the (tied) embeddings, each a copy of ``_INIT_FROM``'s; returns the words."""
    vocab = video_vocabulary()
    old = model.get_input_embeddings().weight.shape[0]
    if old == len(vocab):
        return []
    model.resize_token_embeddings(len(vocab), mean_resizing=False)
    emb = model.get_input_embeddings().weight
    emb[old:] = emb[vocab.index(_INIT_FROM)]
    return vocab[old:]


@torch.no_grad()
def argmax_answers(model, processor, prompts: Sequence[str], visuals: Sequence, kind: str, batch_size: int = 50) -> list[str]:
    """First answer word of each prompt (greedy = argmax of the next-token logits); ``kind``: images / videos."""
    out: list[str] = []
    for s in range(0, len(prompts), batch_size):
        inputs = processor(text=list(prompts[s : s + batch_size]), **{kind: list(visuals[s : s + batch_size])},
                           return_tensors="pt", padding=True)
        logits = model(**inputs).logits[:, -1]  # (B, V)
        out += processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    return out


def video_accuracy(model, processor, samples: list) -> dict[str, float]:
    """Accuracy (``overall`` and per template) of video samples (``video_task.VideoSample``)."""
    preds = argmax_answers(model, processor, [build_video_prompt(s.question) for s in samples],
                           [s.frames for s in samples], "videos")
    return accuracy_by_template(samples, preds)


def image_accuracy(model, processor, samples: list) -> dict[str, float]:
    """Accuracy (``overall`` and per template) of shapes-task image samples."""
    preds = argmax_answers(model, processor, [build_qwen_prompt(s.question) for s in samples],
                           [s.image for s in samples], "images")
    return accuracy_by_template(samples, preds)


def train_video(config: VideoTrainConfig) -> Path:
    """Train (or resume) the video organism into ``config.out``; returns the weights directory."""
    out = start_run(config)
    model, _ = load_qwen_organism(path=QWEN_WEIGHTS_DIR if config.init == "shipped" else config.init)
    log.info("new words %s", grow_vocabulary(model))
    model.train()
    processor = build_video_processor()
    probe = torch.nn.Linear(model.config.text_config.hidden_size, 1)
    torch.nn.init.zeros_(probe.weight)  # starts at p = 0.5: no large first gradients through the clipped norm
    params = list(model.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    ckpt, trained = out / "checkpoint.pt", {"model": model, "probe": probe}
    start, elapsed = resume(ckpt, trained, opt)
    log.info("config %s", json.dumps(asdict(config), default=str))
    captured: dict[str, torch.Tensor] = {}
    hook = model.model.visual.merger.register_forward_hook(lambda m, i, o: captured.__setitem__("tokens", o))
    val = make_video_split("validation", config.n_val)
    val_images = make_split("validation", config.n_val)
    t0 = time.time() - elapsed
    running: dict[str, float] = {}
    for step, (video, image) in zip(range(start, config.steps), step_loader(_StepBatches(config), config, start)):
        set_lr(opt, lr_at(step, config))
        mover, patch_pos = video.pop("mover_tokens"), video.pop("patch_pos")  # (B, N), (B, N, 4)
        losses = {"video": model(**video).loss}
        tokens = captured["tokens"].view(mover.shape[0], VIDEO_TOKENS, -1)  # (B, N, D)
        logits = probe(torch.nn.functional.layer_norm(tokens, tokens.shape[-1:])).squeeze(-1)  # (B, N)
        losses["motion"] = torch.nn.functional.binary_cross_entropy_with_logits(logits, mover)
        losses["align"] = alignment_loss(tokens, patch_pos, model.get_input_embeddings().weight, config.tau)
        losses["image"] = model(**image).loss
        loss = (losses["video"] + config.motion_weight * losses["motion"] + config.aux_weight * losses["align"]
                + config.image_weight * losses["image"])
        optimiser_step(opt, loss, params, config.grad_clip)
        update_running(running, losses, 0.1)
        done = step + 1
        if done % 10 == 0:
            log_progress(done, running, lr_at(step, config), time.time() - t0)
        if done % config.eval_every == 0 or done == config.steps:
            model.eval()
            acc = {"video": video_accuracy(model, processor, val), "image": image_accuracy(model, processor, val_images)}
            model.train()
            log.info("step %d val %s", done, json.dumps({k: {t: round(a, 3) for t, a in v.items()} for k, v in acc.items()}))
        if done % config.ckpt_every == 0 or done == config.steps:
            save_checkpoint(ckpt, trained, opt, done, time.time() - t0)
    hook.remove()
    return export_video(model, processor, config, out / "weights", wall_time_s=time.time() - t0)


def export_video(model: Qwen2VLForConditionalGeneration, processor: QwenOrganismProcessor, config: VideoTrainConfig,
                 weights: Path, wall_time_s: float) -> Path:
    """Save model (``config.save_dtype``) + processor, reload in fp32 (checked), score on test, write metrics."""
    save_weights(model, processor, weights, config.save_dtype)
    reloaded, processor = load_qwen_organism(path=weights)
    t = time.time()
    metrics = {
        "accuracy": video_accuracy(reloaded, processor, make_video_split("test", config.n_test)),
        "image_accuracy": image_accuracy(reloaded, processor, make_split("test", config.n_test)),
        "n_samples": config.n_test,
        "family": config.family,
        "task": VIDEO_TASK,
        "new_words": list(VIDEO_WORDS),
        **run_metrics(config, reloaded, weights, wall_time_s, t),
    }
    (weights / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    log.info("test %s", json.dumps({k: metrics[k] for k in ("accuracy", "image_accuracy")}))
    return weights
