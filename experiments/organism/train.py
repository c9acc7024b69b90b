"""Training of the model organism.

Usage::

    python -m vtprune.experiments.organism.train --out DIR [--steps N] [--seed S]

Contract
--------
* ``train(config) -> Path`` trains a fresh organism (``model.build_model``) on
  multi-turn sequences of the train split (``batching.TrainBatcher``) with the LM loss on
  answer tokens plus ``aux_weight`` x an InfoNCE alignment loss that pulls every projected
  visual token toward the input embeddings of its object's colour word, shape word and
  the generic word "shapes" (background tokens: toward "background"), plus
  ``shape_head_weight`` x the cross-entropy of a training-only linear shape probe on the
  projected tokens (``ShapeHead``; discarded, the shipped model is a plain LLaVA), plus
  ``prompt_weight`` x ``prompt_relevance_loss``: for every question with target objects,
  an InfoNCE over the image's patches that ranks the target object's patches first by
  cosine similarity to the *mean-pooled* question word embeddings (exactly the score
  ZSPAPrune prunes with, so prompt-aware pruning has a signal to work with).
* Deterministic given the config: seeded init, data is a pure function of the step
  (scene indices ``step * batch_size + b``), deterministic torch algorithms.
* Checkpoints (``DIR/checkpoint.pt``) every ``ckpt_every`` steps; a rerun with the same
  ``--out`` resumes from it. Log lines go to ``DIR/train.log`` and stdout. (The run bookkeeping
  shared with ``qwen_train`` and ``video_train`` is in ``training_run``.)
* At the end: saves the model in ``dtype`` (fp16 by default) with ``save_pretrained``
  (safetensors) and the processor into ``DIR/weights``, reloads it in fp32 from the
  saved files, evaluates on ``n_test`` test samples and writes ``DIR/weights/metrics.json``.
  Returns ``DIR/weights``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration

from .batching import TrainBatcher
from .evaluate import evaluate
from .model import ModelSpec, build_model, n_parameters
from .processor import build_processor
from .clutter_train import TASKS, batch_task, initial_model, task_overrides, task_split
from .task import SHAPES, make_split
from .training_run import (
    log, log_progress, optimiser_step, resume, run_metrics, save_checkpoint, save_weights, set_lr, start_run,
    step_loader, step_scenes, update_running,
)


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run."""

    out: str
    steps: int = 8000
    seed: int = 0
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.02
    warmup: int = 200
    weight_decay: float = 0.01
    turns: int = 4
    aux_weight: float = 0.5
    shape_head_weight: float = 1.0
    background_weight: float = 0.2
    tau: float = 0.1
    prompt_weight: float = 0.5
    grad_clip: float = 1.0
    ckpt_every: int = 500
    eval_every: int = 500
    n_val: int = 400
    n_test: int = 2000
    threads: int = 1  # intra-op threads; 1 is far faster than 2 on a shared 2-core box
    workers: int = 1  # batch-building worker processes (0 = build in the main process)
    save_dtype: str = "float16"
    spec: ModelSpec = field(default_factory=ModelSpec)
    task: str = "shapes"  # "shapes" (the original task) or "clutter" (fine-tune on clutter + shapes, clutter_train.py)
    init: str = ""  # "" = fresh seeded init; "shipped" = the shipped weights; else a weights folder


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to ``lr * min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def alignment_loss(proj: torch.Tensor, positives: torch.Tensor, embeddings: torch.Tensor, tau: float) -> torch.Tensor:
    """Multi-positive InfoNCE between projected patches and word embeddings.

    proj: (B, N, D) projector outputs; positives: (B, N, P) word ids per patch;
    embeddings: (V, D) input-embedding matrix. Every positive is a separate softmax
    cross-entropy over the whole vocabulary with the *other* (distinct) positives
    removed from the denominator. Returns a scalar.
    """
    b, n, d = proj.shape
    p = F.normalize(proj.reshape(b * n, d), dim=-1)  # (M, D)
    e = F.normalize(embeddings, dim=-1)  # (V, D)
    logits = p @ e.T / tau  # (M, V)
    pos = positives.reshape(b * n, -1)  # (M, P)
    multi = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, pos, True)  # (M, V)
    losses = []
    for j in range(pos.shape[1]):
        own = torch.zeros_like(multi).scatter_(1, pos[:, j : j + 1], True)  # (M, V)
        masked = logits.masked_fill(multi & ~own, float("-inf"))  # (M, V)
        losses.append(F.cross_entropy(masked, pos[:, j]))
    return torch.stack(losses).mean()


def prompt_relevance_loss(
    proj: torch.Tensor,
    question_ids: torch.Tensor,
    question_mask: torch.Tensor,
    question_targets: torch.Tensor,
    embeddings: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """Multi-positive InfoNCE over patches for the mean-pooled question embedding.

    proj: (B, N, D) projector outputs; question_ids / question_mask: (B, R, L) word ids of
    R questions per image; question_targets: (B, R, N) bool, the patches of the objects
    each question is about; embeddings: (V, D). For each question with at least one target
    patch: ``-log(sum_target exp(s / tau) / sum_all exp(s / tau))`` with ``s`` the cosine
    between a patch and the mean of the question's word embeddings. Returns the mean over
    those questions (0 if there are none).
    """
    words = embeddings[question_ids]  # (B, R, L, D)
    m = question_mask.unsqueeze(-1).to(words.dtype)  # (B, R, L, 1)
    pooled = F.normalize((words * m).sum(2) / m.sum(2).clamp_min(1), dim=-1)  # (B, R, D)
    patches = F.normalize(proj, dim=-1)  # (B, N, D)
    logits = torch.einsum("brd,bnd->brn", pooled, patches) / tau  # (B, R, N)
    has_target = question_targets.any(-1)  # (B, R)
    if not has_target.any():
        return logits.sum() * 0.0
    positive = torch.logsumexp(logits.masked_fill(~question_targets, float("-inf")), dim=-1)  # (B, R)
    total = torch.logsumexp(logits, dim=-1)  # (B, R)
    return (total - positive)[has_target].mean()


class _StepBatches(torch.utils.data.Dataset):
    """Dataset whose item ``step`` is the training batch of that step (pure function of it)."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.batcher = TrainBatcher(turns=config.turns, task=batch_task(config.task))

    def __len__(self) -> int:
        return self.config.steps

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return self.batcher.batch(step_scenes(self.config.seed, step, self.config.batch_size))


class ShapeHead(torch.nn.Module):
    """Training-only linear probe: projected patch (D) -> shape class (len(SHAPES)) or background.

    It is not part of the shipped model; its cross-entropy gives the vision tower a
    direct, undiluted shape signal (the InfoNCE alignment alone learned shape very slowly).
    """

    def __init__(self, dim: int, shape_ids: list[int]) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(dim, len(shape_ids) + 1)
        self.register_buffer("shape_ids", torch.tensor(shape_ids), persistent=False)

    def targets(self, positives: torch.Tensor) -> torch.Tensor:
        """(B, N, P) alignment positives -> (B, N) class ids (background = len(shape_ids))."""
        shape_word = positives[..., 1]  # (B, N)
        match = shape_word.unsqueeze(-1) == self.shape_ids  # (B, N, S)
        bg = torch.full_like(shape_word, len(self.shape_ids))
        return torch.where(match.any(-1), match.float().argmax(-1), bg)  # (B, N)

    def loss(self, proj: torch.Tensor, positives: torch.Tensor, background_weight: float) -> torch.Tensor:
        """Weighted CE of the shape class of every patch (background down-weighted)."""
        logits = self.linear(proj)  # (B, N, S+1)
        weight = torch.ones(logits.shape[-1], device=proj.device)
        weight[-1] = background_weight
        return F.cross_entropy(logits.flatten(0, 1), self.targets(positives).flatten(), weight=weight)


@torch.no_grad()
def _quick_val(model: LlavaForConditionalGeneration, batcher: TrainBatcher, samples: list, processor) -> dict[str, float]:
    """Validation accuracy by argmax of the next-token logits (fast proxy for ``answer``) and relevance AUCs."""
    from .evaluate import accuracy_by_template, encode, prompt_relevance, relevance_auc

    model.eval()
    preds: list[str] = []
    for s in range(0, len(samples), 100):
        chunk = samples[s : s + 100]
        inputs = encode(processor, chunk)
        logits = model(**inputs).logits[:, -1]  # (B, V)
        preds += processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    rel = prompt_relevance(model, processor, samples)
    model.train()
    return {**accuracy_by_template(samples, preds), "auc_mean": relevance_auc(samples, rel["mean"]),
            "auc_max": relevance_auc(samples, rel["max"])}


def train(config: TrainConfig) -> Path:
    """Train (or resume) an organism into ``config.out``; returns the weights directory."""
    out = start_run(config)
    model = (initial_model(config.init) if config.init else build_model(config.spec, seed=config.seed)).train()
    processor = build_processor()
    batcher = TrainBatcher(turns=config.turns)
    head = ShapeHead(config.spec.text_hidden, [batcher.vocab[w] for w in SHAPES])
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    ckpt, trained = out / "checkpoint.pt", {"model": model, "head": head}
    start, elapsed = resume(ckpt, trained, opt)
    log.info("config %s", json.dumps(asdict(config)))
    log.info("parameters %d", n_parameters(model))

    captured: dict[str, torch.Tensor] = {}
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: captured.__setitem__("proj", o))
    val = task_split(config.task, "validation", config.n_val)
    t0 = time.time() - elapsed
    running: dict[str, float] = {}
    for step, batch in zip(range(start, config.steps), step_loader(_StepBatches(config), config, start)):
        patch_pos = batch.pop("patch_pos")
        questions = (batch.pop("question_ids"), batch.pop("question_mask"), batch.pop("question_targets"))
        set_lr(opt, lr_at(step, config))
        lm = model(**batch).loss
        aux = alignment_loss(captured["proj"], patch_pos, model.get_input_embeddings().weight, config.tau)
        shape = head.loss(captured["proj"], patch_pos, config.background_weight)
        prompt = prompt_relevance_loss(captured["proj"], *questions, model.get_input_embeddings().weight, config.tau)
        loss = lm + config.aux_weight * aux + config.shape_head_weight * shape + config.prompt_weight * prompt
        optimiser_step(opt, loss, model.parameters(), config.grad_clip)
        update_running(running, {"lm": lm, "aux": aux, "shape": shape, "prompt": prompt}, 0.02)
        done = step + 1
        if done % 50 == 0:
            log_progress(done, running, lr_at(step, config), time.time() - t0)
        if done % config.eval_every == 0 or done == config.steps:
            acc = _quick_val(model, batcher, val, processor)
            log.info("step %d val %s", done, json.dumps({k: round(v, 3) for k, v in acc.items()}))
        if done % config.ckpt_every == 0 or done == config.steps:
            save_checkpoint(ckpt, trained, opt, done, time.time() - t0)
    hook.remove()
    wall = time.time() - t0
    return export(model, processor, config, out / "weights", wall_time_s=wall)


def export(
    model: LlavaForConditionalGeneration, processor, config: TrainConfig, weights: Path, wall_time_s: float
) -> Path:
    """Save model (``config.save_dtype``) + processor, reload in fp32, evaluate on test, write metrics."""
    save_weights(model, processor, weights, config.save_dtype)
    reloaded = LlavaForConditionalGeneration.from_pretrained(weights, dtype=torch.float32).eval()
    test = task_split(config.task, "test", config.n_test)
    t = time.time()
    res = evaluate(reloaded, processor, test)
    if config.task != "shapes":  # the original task, measured on the same model
        res["shapes"] = evaluate(reloaded, processor, make_split("test", config.n_test))
    metrics = {**res, **run_metrics(config, reloaded, weights, wall_time_s, t)}
    (weights / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info("test %s", json.dumps({k: metrics[k] for k in ("accuracy", "auc_mean", "auc_max")}))
    return weights


def parse_args(argv: list[str] | None) -> TrainConfig:
    """CLI arguments -> ``TrainConfig``."""
    ap = argparse.ArgumentParser(prog="vtprune organism train", description="Train the vtprune model organism.")
    ap.add_argument("--out", required=True, help="run directory (checkpoints, log, weights/)")
    ap.add_argument("--task", choices=TASKS, default="shapes",
                    help="shapes: the shipped organism from scratch; clutter: fine-tune it on clutter + shapes "
                         "(its own defaults, see docs/demo.md)")
    pre = argparse.ArgumentParser(add_help=False)  # the task picks the defaults of every other option
    pre.add_argument("--task", choices=TASKS, default="shapes")
    d = replace(TrainConfig(out=""), **task_overrides(pre.parse_known_args(argv)[0].task))
    ap.add_argument("--init", default=d.init, help='"" fresh init, "shipped" the shipped weights, or a weights folder')
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--turns", type=int, default=d.turns)
    ap.add_argument("--aux-weight", type=float, default=d.aux_weight)
    ap.add_argument("--prompt-weight", type=float, default=d.prompt_weight)
    ap.add_argument("--n-test", type=int, default=d.n_test)
    ap.add_argument("--n-val", type=int, default=d.n_val)
    ap.add_argument("--eval-every", type=int, default=d.eval_every)
    ap.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--workers", type=int, default=d.workers)
    s = ModelSpec()
    ap.add_argument("--vision-hidden", type=int, default=s.vision_hidden)
    ap.add_argument("--vision-layers", type=int, default=s.vision_layers)
    ap.add_argument("--text-hidden", type=int, default=s.text_hidden)
    ap.add_argument("--text-layers", type=int, default=s.text_layers)
    a = ap.parse_args(argv)
    spec = ModelSpec(vision_hidden=a.vision_hidden, vision_layers=a.vision_layers,
                     text_hidden=a.text_hidden, text_layers=a.text_layers)
    return replace(d, out=a.out, task=a.task, init=a.init, steps=a.steps, seed=a.seed, batch_size=a.batch_size, lr=a.lr, turns=a.turns,
                       aux_weight=a.aux_weight, prompt_weight=a.prompt_weight, n_test=a.n_test, n_val=a.n_val, eval_every=a.eval_every,
                       ckpt_every=a.ckpt_every, threads=a.threads, workers=a.workers, spec=spec)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints the weights directory."""
    path = train(parse_args(argv))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
