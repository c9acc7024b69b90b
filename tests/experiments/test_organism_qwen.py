"""Tests of the Qwen2-VL model organism: processor, token order, batches, LLaVA initialisation, training
smoke run and determinism, CLI defaults, shipped weights."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from vtprune.experiments.organism import QWEN_WEIGHTS_DIR, WEIGHTS_DIR
from vtprune.experiments.organism.qwen_batching import QwenTrainBatcher
from vtprune.experiments.organism.qwen_model import QwenSpec, build_qwen_model, init_text_from_llava, mrope_section
from vtprune.experiments.organism.qwen_processor import (
    QWEN_IMAGE_SIZE,
    QWEN_IMAGE_TOKENS,
    QWEN_MERGE,
    QWEN_PATCH,
    QWEN_TEMPORAL_PATCH,
    build_qwen_processor,
    build_qwen_prompt,
    qwen_vocabulary,
)
from vtprune.experiments.organism.task import BG_LEVEL, IMAGE_SIZE, N_PATCHES, PATCH, make_split, scene_samples

TINY = QwenSpec(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=128, text_layers=1)


def test_processor_is_a_qwen2_vl_processor_with_64_merged_tokens() -> None:
    proc = build_qwen_processor()
    assert isinstance(proc, transformers.Qwen2VLProcessor)
    samples = make_split("test", 2)
    out = proc(images=[s.image for s in samples], text=[build_qwen_prompt(s.question) for s in samples],
               return_tensors="pt", padding=True)
    side = QWEN_IMAGE_SIZE // QWEN_PATCH
    assert QWEN_IMAGE_SIZE == 224 and side == 16 and QWEN_IMAGE_TOKENS == N_PATCHES == 64
    assert out["image_grid_thw"].tolist() == [[1, side, side]] * 2
    assert out["pixel_values"].shape == (2 * side * side, 3 * QWEN_TEMPORAL_PATCH * QWEN_PATCH * QWEN_PATCH)
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ((out["input_ids"] == pad).sum(1) == QWEN_IMAGE_TOKENS).all()
    assert proc.tokenizer.unk_token_id not in out["input_ids"].tolist()[0]
    assert ((out["mm_token_type_ids"] == 1) == (out["input_ids"] == pad)).all()


def test_merged_token_i_sees_scene_patch_i() -> None:
    """A bright 8 px patch of the 64 px scene lands in the 2 x 2 patch group of merged token i (row-major)."""
    proc = build_qwen_processor()
    rows = IMAGE_SIZE // PATCH
    for i in (0, 9, 27, 63):
        image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), BG_LEVEL, dtype=np.uint8)
        r, c = divmod(i, rows)
        image[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = 250
        pixels = proc.image_processor(images=[image], return_tensors="pt")["pixel_values"]  # (256, 1176)
        energy = (pixels - pixels.min()).abs().sum(-1).view(QWEN_IMAGE_TOKENS, QWEN_MERGE * QWEN_MERGE).sum(-1)
        assert int(energy.argmax()) == i


def test_processor_round_trips_through_save_pretrained(tmp_path: Path) -> None:
    from vtprune.experiments.organism.loading import load_processor

    proc = build_qwen_processor()
    proc.save_pretrained(tmp_path)
    again = load_processor(tmp_path)
    samples = make_split("test", 3)
    kw = dict(images=[s.image for s in samples], text=[build_qwen_prompt(s.question) for s in samples],
              return_tensors="pt", padding=True)
    a, b = proc(**kw), again(**kw)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"


def test_batcher_matches_processor() -> None:
    proc = build_qwen_processor()
    batch = QwenTrainBatcher(turns=1, split="test").batch([3])
    samples = scene_samples("test", 3)
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    encoded = [proc(images=[samples[0].image], text=[build_qwen_prompt(s.question) + f" {s.answer} </s>"],
                    return_tensors="pt") for s in samples]
    match = [e for e in encoded if e["input_ids"][0].tolist() == ids]
    assert match, "the batch's turn is none of the scene's questions"
    for key in ("pixel_values", "image_grid_thw", "mm_token_type_ids"):
        assert torch.allclose(batch[key][0 if key == "mm_token_type_ids" else slice(None)].float(),
                              match[0][key][0 if key == "mm_token_type_ids" else slice(None)].float(), atol=1e-5), key
    assert (batch["labels"][0] != -100).sum() == 2
    assert batch["teacher_pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_mrope_sections_cover_half_the_head() -> None:
    for head_dim in (16, 32, 64, 128):
        parts = mrope_section(head_dim)
        assert sum(parts) == head_dim // 2 and len(parts) == 3 and min(parts) > 0
    with pytest.raises(ValueError, match="head_dim"):
        mrope_section(8)


def test_config_is_qwen2_vl_with_mrope_and_patch_14() -> None:
    model = build_qwen_model(QwenSpec())
    cfg = model.config
    assert cfg.model_type == "qwen2_vl" and cfg.vision_config.patch_size == 14
    assert cfg.vision_config.spatial_merge_size == 2
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) == cfg.text_config.hidden_size // cfg.text_config.num_attention_heads // 2
    vocab = qwen_vocabulary()
    assert cfg.image_token_id == vocab.index("<|image_pad|>") and cfg.vision_start_token_id == vocab.index("<|vision_start|>")


def _llava_reference_hidden(ids: torch.Tensor) -> torch.Tensor:
    from vtprune.experiments.organism import load_organism

    llava, _ = load_organism()
    return llava.model.language_model(input_ids=ids).last_hidden_state


def test_text_model_initialised_from_llava_computes_the_same_function() -> None:
    """For text tokens M-RoPE ids are equal on the three axes, so the copied Qwen2 text model (zero q/k/v bias,
    rope theta as Llama's) reproduces the LLaVA organism's text model on a text-only input once its RMSNorm
    epsilon is Llama's (the organism keeps Qwen2-VL's default 1e-5 vs the LLaVA organism's 1e-6; training
    absorbs the difference, see docs/demo.md)."""
    if not (WEIGHTS_DIR / "model.safetensors").exists():
        pytest.skip("no LLaVA organism weights")
    model = build_qwen_model(QwenSpec())
    copied = init_text_from_llava(model, WEIGHTS_DIR)
    assert any("layers.1.mlp" in k for k in copied) and any("embed_tokens" in k for k in copied)
    proc = build_qwen_processor()
    ids = torch.tensor([proc.tokenizer("USER: what color is the circle ? ASSISTANT:")["input_ids"]])  # (1, T)
    from vtprune.experiments.organism import load_organism

    llava_eps = load_organism()[0].config.text_config.rms_norm_eps
    for module in model.model.language_model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = llava_eps
    got = model.model.language_model(input_ids=ids).last_hidden_state
    assert torch.allclose(got, _llava_reference_hidden(ids), atol=1e-5)


def _tiny_config(out: Path, steps: int, **extra):
    from vtprune.experiments.organism.qwen_train import QwenTrainConfig

    return QwenTrainConfig(out=str(out), steps=steps, batch_size=2, turns=2, warmup=1, ckpt_every=steps,
                           eval_every=steps, n_val=4, n_test=8, spec=TINY, **extra)


def test_training_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    if not (WEIGHTS_DIR / "model.safetensors").exists():
        pytest.skip("the Qwen organism is initialised from and distilled against the LLaVA organism")
    from vtprune.experiments.organism.command import train_any as train

    cfg = _tiny_config(tmp_path / "run", steps=2)
    weights = train(cfg)  # dispatches on the config's type
    metrics = json.loads((weights / "metrics.json").read_text())
    assert metrics["family"] == "qwen2_vl" and metrics["steps"] == 2 and "overall" in metrics["accuracy"]
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    assert train(cfg) == weights


def test_training_is_deterministic(tmp_path: Path) -> None:
    if not (WEIGHTS_DIR / "model.safetensors").exists():
        pytest.skip("needs the LLaVA organism")
    from safetensors.torch import load_file

    from vtprune.experiments.organism.qwen_train import train_qwen

    tensors = [load_file(str(train_qwen(_tiny_config(tmp_path / run, steps=2)) / "model.safetensors")) for run in "ab"]
    assert tensors[0].keys() == tensors[1].keys()
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])


def test_cli_family_option_selects_the_qwen_config() -> None:
    from vtprune.experiments.organism.command import parse_args
    from vtprune.experiments.organism.qwen_train import QwenTrainConfig
    from vtprune.experiments.organism.train import TrainConfig
    from vtprune.experiments.organism.train import parse_args as llava_parse_args

    # the default still reproduces the LLaVA organism
    assert type(parse_args(["--out", "x"])) is TrainConfig
    assert asdict(parse_args(["--out", "x"])) == asdict(llava_parse_args(["--out", "x"]))
    assert asdict(parse_args(["--out", "x", "--family", "llava", "--steps", "7"])) == asdict(
        llava_parse_args(["--out", "x", "--steps", "7"]))
    cfg = parse_args(["--out", "x", "--family", "qwen2_vl"])
    assert isinstance(cfg, QwenTrainConfig) and asdict(cfg) == asdict(QwenTrainConfig(out="x"))
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--family", "gpt"])


# ---------------------------------------------------------------- shipped Qwen2-VL organism
def _shipped() -> Path:
    if not (QWEN_WEIGHTS_DIR / "model.safetensors").exists():
        pytest.skip("Qwen2-VL organism weights not shipped yet")
    return QWEN_WEIGHTS_DIR


def test_shipped_weights_come_from_the_default_command() -> None:
    from vtprune.experiments.organism.command import parse_args

    recorded = json.loads((_shipped() / "metrics.json").read_text())["config"]
    assert recorded == asdict(parse_args(["--out", recorded["out"], "--family", "qwen2_vl"]))


def test_shipped_metrics_and_size() -> None:
    weights = _shipped()
    metrics = json.loads((weights / "metrics.json").read_text())
    assert metrics["accuracy"]["overall"] >= 0.97, metrics["accuracy"]
    assert metrics["stored_dtype"] == "float16"
    assert sum(f.stat().st_size for f in weights.iterdir()) < 10 * 2**20


def test_shipped_organism_accuracy() -> None:
    _shipped()
    from vtprune.experiments.organism import load_qwen_organism
    from vtprune.experiments.organism.evaluate import accuracy_by_template, answer

    model, processor = load_qwen_organism()
    samples = make_split("test", 200)
    acc = accuracy_by_template(samples, answer(model, processor, samples))
    assert acc["overall"] >= 0.95, acc


def test_demo_grid_runs_on_a_qwen_organism(tmp_path: Path) -> None:
    """``vtprune demo --organism qwen2_vl``'s overrides drive the demo grid through the Qwen2-VL adapter (a tiny
    random organism saved like the shipped one stands in for the weights)."""
    from vtprune.cli import demo_grid_path
    from vtprune.experiments.config import load_grid
    from vtprune.experiments.organism.demo_models import demo_overrides
    from vtprune.experiments.runner import run_grid

    with pytest.raises(ValueError, match="valid: llava, qwen2_vl"):
        demo_overrides("blip")
    assert demo_overrides("llava") == []
    weights = tmp_path / "weights"
    build_qwen_model(TINY).save_pretrained(weights)
    build_qwen_processor().save_pretrained(weights)
    overrides = demo_overrides("qwen2_vl") + [
        ("model.name", str(weights)), ("output_dir", str(tmp_path / "out")), ("task.limit", 2),
        ("grid.budget", [0.25]), ("grid.method.recipe", ["zspaprune"]), ("seeds", [0]),
        ("tracking.mode", "disabled"), ("exclude", []), ("include", []),
    ]
    spec = load_grid(demo_grid_path(), overrides)
    summary = run_grid(spec, progress=False)
    assert not summary.failed
    rows = [json.loads(line) for line in (tmp_path / "out" / "cells.jsonl").read_text().splitlines()]
    assert len(rows) == 2


def test_cli_family_goes_to_the_family_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import vtprune.experiments.organism.command as command
    from vtprune.cli import main

    seen: list[list[str]] = []
    monkeypatch.setattr(command, "main", lambda argv: seen.append(argv) or 0)
    assert main(["organism", "train", "--family", "qwen2_vl", "--out", "run"]) == 0
    assert seen == [["--family", "qwen2_vl", "--out", "run"]]
    assert isinstance(command.parse_args(seen[0]), command.QwenTrainConfig)
