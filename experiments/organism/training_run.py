"""The bookkeeping every organism trainer shares (``train``, ``qwen_train``, ``video_train``).

Contract
--------
* ``start_run(config) -> Path``: creates ``config.out``, logs to ``DIR/train.log`` and stdout (``log``), sets the
  intra-op threads, deterministic algorithms and the global seed (in that order, before any model is built).
* ``step_scenes`` / ``step_loader``: the training batch of a step is a pure function of the step (scene indices
  ``seed * 1_000_003 + step * size (+ offset)``, modulo ``SCENE_RANGE``), built in ``workers`` processes.
* ``set_lr``, ``optimiser_step`` (zero grads, backward, clip the given parameters' norm, step) and
  ``update_running`` (exponential moving averages of the logged losses, ``log_progress`` logs them).
* ``resume`` / ``save_checkpoint``: ``DIR/checkpoint.pt`` holds each named module's state, the optimiser's, the
  step reached and the elapsed seconds; it is written to a temporary file first, then renamed.
* ``save_weights`` (model in ``save_dtype`` + processor, the model back in fp32) and ``run_metrics`` (the fields
  every ``metrics.json`` ends with, ``config`` last).
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .model import n_parameters

__all__ = [
    "SCENE_RANGE", "log", "log_progress", "machine", "optimiser_step", "resume", "run_metrics", "save_checkpoint",
    "save_weights", "set_lr", "setup_logging", "start_run", "step_loader", "step_scenes", "update_running",
]

log = logging.getLogger("vtprune.organism.train")

SCENE_RANGE = 9_999_999  # scene indices wrap here
_SEED_STRIDE = 1_000_003  # keeps the train scenes of different seeds apart while staying deterministic


def setup_logging(out: Path) -> None:
    """Log lines to ``out / "train.log"`` and stdout (replacing earlier handlers)."""
    log.setLevel(logging.INFO)
    log.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for h in (logging.FileHandler(out / "train.log"), logging.StreamHandler(sys.stdout)):
        h.setFormatter(fmt)
        log.addHandler(h)


def machine() -> str:
    """The machine and torch version a run was measured on (for ``metrics.json``)."""
    return f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, torch {torch.__version__}".strip()


def start_run(config: Any) -> Path:
    """Create the run folder, start logging, and make the run deterministic; returns the folder."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out)
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(config.seed)
    return out


def step_scenes(seed: int, step: int, size: int, offset: int = 0) -> list[int]:
    """The ``size`` scene indices of a training step (a pure function of seed and step)."""
    base = seed * _SEED_STRIDE + step * size + offset
    return [(base + b) % SCENE_RANGE for b in range(size)]


def step_loader(dataset: torch.utils.data.Dataset, config: Any, start: int) -> torch.utils.data.DataLoader:
    """Items ``start..steps-1`` of a step-indexed dataset, built in a worker process when ``workers > 0``."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(start, config.steps),
        num_workers=config.workers, prefetch_factor=4 if config.workers else None,
        persistent_workers=False,
    )


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for g in opt.param_groups:
        g["lr"] = lr


def optimiser_step(
    opt: torch.optim.Optimizer, loss: torch.Tensor, clipped: Iterable[torch.Tensor], max_norm: float
) -> None:
    """One update: zero the gradients, backward, clip the norm of ``clipped``'s gradients, step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(clipped, max_norm)
    opt.step()


def update_running(running: dict[str, float], losses: Mapping[str, torch.Tensor], new_weight: float) -> None:
    """Exponential moving average of each loss, the newest value weighted ``new_weight`` (its first value as is)."""
    keep = 1 - new_weight
    for k, v in losses.items():
        running[k] = keep * running[k] + new_weight * v.item() if k in running else v.item()


def log_progress(done: int, running: Mapping[str, float], lr: float, seconds: float) -> None:
    """One progress line: steps done, each running loss, the learning rate, seconds since the start."""
    log.info("step %d %s lr %.2e %.1fs", done, " ".join(f"{k} {v:.4f}" for k, v in running.items()), lr, seconds)


def resume(ckpt: Path, modules: Mapping[str, torch.nn.Module], opt: torch.optim.Optimizer) -> tuple[int, float]:
    """Load ``ckpt`` into the named modules and the optimiser if it exists; returns (step, elapsed seconds)."""
    if not ckpt.exists():
        return 0, 0.0
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    for name, module in modules.items():
        module.load_state_dict(state[name])
    opt.load_state_dict(state["optim"])
    log.info("resumed from step %d", state["step"])
    return state["step"], state["elapsed"]


def save_checkpoint(
    ckpt: Path, modules: Mapping[str, torch.nn.Module], opt: torch.optim.Optimizer, step: int, elapsed: float
) -> None:
    """Write the named modules', the optimiser's state, ``step`` and ``elapsed`` to ``ckpt`` (atomically)."""
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    state = {name: module.state_dict() for name, module in modules.items()}
    torch.save({**state, "optim": opt.state_dict(), "step": step, "elapsed": elapsed}, tmp)
    tmp.replace(ckpt)


def save_weights(model: torch.nn.Module, processor: Any, weights: Path, save_dtype: str) -> None:
    """Save the model in ``save_dtype`` (safetensors) and the processor into ``weights``; the model ends in fp32,
    eval mode."""
    weights.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.to(getattr(torch, save_dtype)).save_pretrained(weights, safe_serialization=True)
    processor.save_pretrained(weights)
    model.to(torch.float32)


def run_metrics(config: Any, reloaded: torch.nn.Module, weights: Path, wall_time_s: float, eval_start: float) -> dict:
    """The run fields of ``metrics.json``: steps, seed, times, machine, size and dtypes, then the config."""
    return {
        "steps": config.steps,
        "seed": config.seed,
        "wall_time_s": round(wall_time_s, 1),
        "eval_time_s": round(time.time() - eval_start, 1),
        "machine": machine(),
        "threads": config.threads,
        "n_parameters": n_parameters(reloaded),
        "weights_bytes": sum(f.stat().st_size for f in weights.glob("*.safetensors")),
        "stored_dtype": config.save_dtype,
        "evaluated_dtype": "float32 (reloaded from the stored file)",
        "config": asdict(config),
    }
