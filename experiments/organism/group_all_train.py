"""Fine-tune and measure the ``all`` probe (issue 18; ``group_all.py``): not a shipped organism.

Usage::

    python -m vtprune.experiments.organism.group_all_train train --out DIR [--steps 400]
    python -m vtprune.experiments.organism.group_all_train curves --weights DIR/weights --n 300

Contract
--------
* ``train``: starts from ``weights_clutter/`` (fp32), appends ``GROUP_WORDS`` to its embeddings
  (``group_all.grow_vocabulary``) and fine-tunes with the ``--task clutter`` recipe
  (``clutter_train.CLUTTER_OVERRIDES``: lr, warm-up, steps; ``train.TrainConfig``'s other defaults; the same
  losses, ``train.alignment_loss`` / ``prompt_relevance_loss`` / ``ShapeHead``) on ``group_all.GroupBatcher``
  batches (clutter + group scenes + shapes rehearsal). Deterministic given the seed; resumes from
  ``DIR/checkpoint.pt``; logs validation accuracy per template (``make_whole_split``) to ``DIR/train.log``;
  saves ``DIR/weights`` (fp16 safetensors + the extended processor).
* ``curves``: the split oracle (``split_oracle.split_outcomes``) on ``make_whole_split(split, n)`` at each
  budget: accuracy per critical count, overall and per template, the fixed ratios / ``dynamic`` / ``auto``
  rows (``split_table.split_rows``), and the unpruned accuracy.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .group_all import GroupBatcher, build_group_processor, grow_vocabulary, make_whole_split
from .task import SHAPES, Sample

__all__ = ["curves", "fine_tune", "main"]


class _Steps(torch.utils.data.Dataset):
    """Item ``step``: the training batch of that step (a pure function of it and the seed)."""

    def __init__(self, steps: int, batch_size: int, seed: int, turns: int) -> None:
        self.steps, self.batch_size, self.seed = steps, batch_size, seed
        self.batcher = GroupBatcher(turns=turns)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        base = self.seed * 1_000_003 + step * self.batch_size  # as train._StepBatches
        return self.batcher.batch([base + b for b in range(self.batch_size)])


def fine_tune(out: Path, steps: int, seed: int = 0, n_val: int = 200, log_every: int = 50) -> Path:
    """Fine-tune ``weights_clutter/`` on the group mix into ``out`` (module doc); returns ``out / "weights"``."""
    from transformers import LlavaForConditionalGeneration

    from . import WEIGHTS_DIR
    from .clutter_train import CLUTTER_OVERRIDES
    from .train import ShapeHead, TrainConfig, _quick_val, alignment_loss, lr_at, prompt_relevance_loss

    out.mkdir(parents=True, exist_ok=True)
    recipe = {k: v for k, v in CLUTTER_OVERRIDES.items() if k not in ("init", "steps")}
    cfg = replace(TrainConfig(out=str(out)), **recipe, steps=steps, seed=seed)
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration.from_pretrained(WEIGHTS_DIR.parent / "weights_clutter", dtype=torch.float32)
    grow_vocabulary(model)
    model.train()
    processor = build_group_processor()
    vocab = processor.tokenizer.get_vocab()
    head = ShapeHead(cfg.spec.text_hidden, [vocab[w] for w in SHAPES])
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=cfg.lr,
                            weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    ckpt, start, t0 = out / "checkpoint.pt", 0, time.time()
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optim"])
        start, t0 = state["step"], time.time() - state["elapsed"]
    logf = (out / "train.log").open("a")

    def log(msg: str) -> None:
        logf.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        logf.flush()

    log(f"config {json.dumps({'steps': steps, 'seed': seed, 'lr': cfg.lr, 'warmup': cfg.warmup, 'start': start})}")
    captured: dict[str, torch.Tensor] = {}
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: captured.__setitem__("proj", o))
    val = make_whole_split("validation", n_val)
    loader = torch.utils.data.DataLoader(_Steps(steps, cfg.batch_size, seed, cfg.turns), batch_size=None,
                                         sampler=range(start, steps), num_workers=1, prefetch_factor=4)
    for step, batch in zip(range(start, steps), loader):
        patch_pos = batch.pop("patch_pos")
        questions = (batch.pop("question_ids"), batch.pop("question_mask"), batch.pop("question_targets"))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        emb = model.get_input_embeddings().weight  # (V, D)
        lm = model(**batch).loss
        loss = (lm + cfg.aux_weight * alignment_loss(captured["proj"], patch_pos, emb, cfg.tau)
                + cfg.shape_head_weight * head.loss(captured["proj"], patch_pos, cfg.background_weight)
                + cfg.prompt_weight * prompt_relevance_loss(captured["proj"], *questions, emb, cfg.tau))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        done = step + 1
        if done % log_every == 0:
            log(f"step {done} lm {lm.item():.4f} loss {loss.item():.4f} {time.time() - t0:.1f}s")
        if done % cfg.eval_every == 0 or done == steps:
            acc = _quick_val(model, None, val, processor)
            log(f"step {done} val {json.dumps({k: round(v, 3) for k, v in acc.items()})}")
            tmp = out / "checkpoint.pt.tmp"
            torch.save({"model": model.state_dict(), "head": head.state_dict(), "optim": opt.state_dict(),
                        "step": done, "elapsed": time.time() - t0}, tmp)
            tmp.replace(ckpt)
    hook.remove()
    weights = out / "weights"
    model.eval().to(torch.float16).save_pretrained(weights, safe_serialization=True)
    processor.save_pretrained(weights)
    log(f"saved {weights} after {time.time() - t0:.1f}s")
    return weights


def curves(model: Any, processor: Any, samples: Sequence[Sample], budget: int) -> dict[str, Any]:
    """One budget: ``per_critical`` (C,), ``per_template`` {template: (C,)}, ``rows`` {name: accuracy}, ``auto_counts``."""
    from vtprune.strategies.budget import AutoSplit

    from .split_oracle import split_outcomes
    from .split_table import split_rows

    res = split_outcomes(model, processor, samples, budget)
    templates = np.array([s.template for s in samples])
    rows, chosen = split_rows(res.correct, res.scores, budget, AutoSplit())
    return {
        "correct": res.correct,
        "per_critical": res.correct.mean(axis=0),
        "per_template": {t: res.correct[templates == t].mean(axis=0) for t in dict.fromkeys(templates.tolist())},
        "rows": {k: v[0] for k, v in rows.items()},
        "auto_counts": np.bincount(chosen, minlength=budget + 1),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (module doc)."""
    ap = argparse.ArgumentParser(prog="python -m vtprune.experiments.organism.group_all_train")
    sub = ap.add_subparsers(dest="verb", required=True)
    tr = sub.add_parser("train")
    tr.add_argument("--out", required=True)
    tr.add_argument("--steps", type=int, default=400)
    tr.add_argument("--seed", type=int, default=0)
    cu = sub.add_parser("curves")
    cu.add_argument("--weights", required=True)
    cu.add_argument("--split", default="validation", choices=("validation", "test"))
    cu.add_argument("--n", type=int, default=300)
    cu.add_argument("--budgets", type=int, nargs="+", default=[4, 6, 12])
    a = ap.parse_args(argv)
    if a.verb == "train":
        print(fine_tune(Path(a.out), a.steps, a.seed))
        return 0
    from transformers import LlavaForConditionalGeneration

    from .evaluate import accuracy_by_template, answer

    torch.set_num_threads(1)
    model = LlavaForConditionalGeneration.from_pretrained(a.weights, dtype=torch.float32).eval()
    processor = build_group_processor()
    samples = make_whole_split(a.split, a.n)
    preds = answer(model, processor, samples)
    print(f"## {a.split}, n={a.n}, {a.weights}: all 64 tokens {json.dumps({k: round(v, 3) for k, v in accuracy_by_template(samples, preds).items()})}")
    for budget in a.budgets:
        cur = curves(model, processor, samples, budget)
        print(f"{budget} tokens: accuracy by critical count 0..{budget}: " + " ".join(f"{v:.3f}" for v in cur["per_critical"]))
        for t, v in cur["per_template"].items():
            print(f"  {t}: " + " ".join(f"{x:.3f}" for x in v))
        print("  " + ", ".join(f"{k} {v:.3f}" for k, v in cur["rows"].items()) + f"; auto counts {cur['auto_counts'].tolist()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
