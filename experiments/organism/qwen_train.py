"""Training of the Qwen2-VL model organism (``vtprune organism train --family qwen2_vl``).

Contract
--------
* ``QwenTrainConfig`` is ``train.TrainConfig`` with ``family = "qwen2_vl"``, a ``QwenSpec`` and its own
  defaults (fewer steps: the text model starts from the LLaVA organism's, ``QwenSpec.init_from_llava``).
* ``train_qwen(config) -> Path`` runs the LLaVA organism's recipe on the same synthetic task: LM loss on the
  answers + ``aux_weight`` x ``train.alignment_loss`` + ``shape_head_weight`` x the training-only
  ``train.ShapeHead`` + ``prompt_weight`` x ``train.prompt_relevance_loss`` (the prompt-relevance alignment),
  applied to the visual tokens the LLM receives (the output of ``model.model.visual.merger``, (B, 64, D)),
  plus ``distill_weight`` x ``distillation_loss``: the relative squared error between those tokens and the
  shipped LLaVA organism's projected visual tokens of the same scene (the teacher; its text model is also the
  starting point, so the Qwen2-VL vision tower learns to speak the language the text model already reads).
  Deterministic given the config (seeded init, data a pure function of the step, deterministic algorithms);
  checkpoints every ``ckpt_every`` steps in ``DIR/checkpoint.pt`` (a rerun resumes); log ``DIR/train.log``.
* At the end the model is saved in ``save_dtype`` (fp16) into ``DIR/weights``, reloaded in fp32 with the
  checked loader and evaluated on ``n_test`` test questions (``DIR/weights/metrics.json``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import Qwen2VLForConditionalGeneration

from .evaluate import evaluate, projected_visual_tokens
from .loading import WEIGHTS_DIR, load_organism
from .model import n_parameters
from .qwen_batching import QwenTrainBatcher
from .qwen_model import QwenSpec, build_qwen_model, init_text_from_llava
from .qwen_processor import QWEN_IMAGE_TOKENS, build_qwen_processor
from .task import SHAPES, make_split
from .train import ShapeHead, TrainConfig, _quick_val, alignment_loss, lr_at, prompt_relevance_loss
from .training_run import (
    log, log_progress, optimiser_step, resume, run_metrics, save_checkpoint, save_weights, set_lr, start_run,
    step_loader, step_scenes, update_running,
)

__all__ = ["QWEN_FAMILY", "QwenTrainConfig", "train_qwen"]

QWEN_FAMILY = "qwen2_vl"


@dataclass
class QwenTrainConfig(TrainConfig):
    """Hyper-parameters of one Qwen2-VL organism run (defaults = the shipped Qwen2-VL organism)."""

    steps: int = 1500
    batch_size: int = 16
    warmup: int = 100
    eval_every: int = 250
    ckpt_every: int = 250
    distill_weight: float = 1.0
    family: str = QWEN_FAMILY
    spec: QwenSpec = field(default_factory=QwenSpec)


class _QwenStepBatches(torch.utils.data.Dataset):
    """Item ``step`` = the training batch of that step (pure function of it), as ``train._StepBatches``."""

    def __init__(self, config: QwenTrainConfig) -> None:
        self.config = config
        self.batcher = QwenTrainBatcher(turns=config.turns)

    def __len__(self) -> int:
        return self.config.steps

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return self.batcher.batch(step_scenes(self.config.seed, step, self.config.batch_size))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Relative squared error ``sum (s - t)^2 / sum t^2`` of (B, N, D) visual tokens (scalar, 0 = equal)."""
    return ((student - teacher) ** 2).sum() / (teacher**2).sum().clamp_min(torch.finfo(teacher.dtype).tiny)


def _initial_model(config: QwenTrainConfig) -> Qwen2VLForConditionalGeneration:
    model = build_qwen_model(config.spec, seed=config.seed)
    if config.spec.init_from_llava:
        copied = init_text_from_llava(model, WEIGHTS_DIR)
        log.info("initialised %d text-model tensors from the LLaVA organism", len(copied))
    return model.train()


def train_qwen(config: QwenTrainConfig) -> Path:
    """Train (or resume) a Qwen2-VL organism into ``config.out``; returns the weights directory."""
    out = start_run(config)
    model = _initial_model(config)
    teacher = load_organism(path=WEIGHTS_DIR)[0].requires_grad_(False)
    processor = build_qwen_processor()
    batcher = QwenTrainBatcher(turns=config.turns)
    head = ShapeHead(config.spec.text_hidden, [batcher.vocab[w] for w in SHAPES])
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    ckpt, trained = out / "checkpoint.pt", {"model": model, "head": head}
    start, elapsed = resume(ckpt, trained, opt)
    log.info("config %s", json.dumps(asdict(config)))
    log.info("parameters %d", n_parameters(model))

    captured: dict[str, torch.Tensor] = {}

    def grab(module, inputs, output) -> None:
        captured["proj"] = output.view(-1, QWEN_IMAGE_TOKENS, output.shape[-1])  # (B, N, D)

    hook = model.model.visual.merger.register_forward_hook(grab)
    val = make_split("validation", config.n_val)
    t0 = time.time() - elapsed
    running: dict[str, float] = {}
    for step, batch in zip(range(start, config.steps), step_loader(_QwenStepBatches(config), config, start)):
        patch_pos = batch.pop("patch_pos")
        questions = (batch.pop("question_ids"), batch.pop("question_mask"), batch.pop("question_targets"))
        target = projected_visual_tokens(teacher, batch.pop("teacher_pixel_values"))  # (B, N, D)
        set_lr(opt, lr_at(step, config))
        emb = model.get_input_embeddings().weight
        losses = {"lm": model(**batch).loss}
        losses["aux"] = alignment_loss(captured["proj"], patch_pos, emb, config.tau)
        losses["shape"] = head.loss(captured["proj"], patch_pos, config.background_weight)
        losses["prompt"] = prompt_relevance_loss(captured["proj"], *questions, emb, config.tau)
        losses["distill"] = distillation_loss(captured["proj"], target)
        loss = (losses["lm"] + config.aux_weight * losses["aux"] + config.shape_head_weight * losses["shape"]
                + config.prompt_weight * losses["prompt"] + config.distill_weight * losses["distill"])
        optimiser_step(opt, loss, model.parameters(), config.grad_clip)
        update_running(running, losses, 0.02)
        done = step + 1
        if done % 50 == 0:
            log_progress(done, running, lr_at(step, config), time.time() - t0)
        if done % config.eval_every == 0 or done == config.steps:
            acc = _quick_val(model, batcher, val, processor)
            log.info("step %d val %s", done, json.dumps({k: round(v, 3) for k, v in acc.items()}))
        if done % config.ckpt_every == 0 or done == config.steps:
            save_checkpoint(ckpt, trained, opt, done, time.time() - t0)
    hook.remove()
    return export_qwen(model, processor, config, out / "weights", wall_time_s=time.time() - t0)


def export_qwen(model: Qwen2VLForConditionalGeneration, processor, config: QwenTrainConfig, weights: Path,
                wall_time_s: float) -> Path:
    """Save model (``config.save_dtype``) + processor, reload in fp32 (checked), evaluate on test, write metrics."""
    from .loading import load_qwen_organism

    save_weights(model, processor, weights, config.save_dtype)
    reloaded, processor = load_qwen_organism(path=weights)
    test = make_split("test", config.n_test)
    t = time.time()
    res = evaluate(reloaded, processor, test)
    metrics = {**res, "family": QWEN_FAMILY, **run_metrics(config, reloaded, weights, wall_time_s, t)}
    (weights / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info("test %s", json.dumps({k: metrics[k] for k in ("accuracy", "auc_mean", "auc_max")}))
    return weights
