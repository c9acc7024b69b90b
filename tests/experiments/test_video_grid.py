"""The video grid (experiments/configs/video.yaml) validates with ``vtprune plan`` alone: no model loads.

Planned twice, as tests/experiments/test_paper_grids.py does for the image papers: as shipped (the hub id, whose
model checks are deferred unless its config is cached) and against a local config of LLaVA-OneVision-7B's
published architecture (transformers' config classes, no weights), where the model checks run and are shown to
catch a recipe the model cannot take.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from vtprune.cli import main
from vtprune.experiments.config import CONFIG_DIR, load_grid
from vtprune.experiments.models import describe_model
from vtprune.framework import build_registry
from vtprune.strategies.functional.temporal import dycoke_ttm_count

GRID = CONFIG_DIR / "video.yaml"
MODEL = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
TASKS = ["videomme", "mvbench", "egoschema"]
RATIOS = [0.25, 0.2, 0.15, 0.1]  # FastVID / HoliTom retention on LLaVA-OneVision
FRAMES, SIDE = 32, 14  # 32 frames of 14 x 14 tokens (27 x 27 SigLIP patches pooled 2 x 2)


def _onevision_config(folder: Path) -> str:
    """LLaVA-OneVision-7B's dimensions: SigLIP so400m (1152 wide, the 26 layers the HF config keeps, 384 px, patch 14) and Qwen2-7B (3584
    wide, 28 layers, 28 heads / 4 KV heads)."""
    from transformers import LlavaOnevisionConfig

    text = dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                intermediate_size=18944, vocab_size=152128)
    vision = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                  num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False)
    config = LlavaOnevisionConfig(text_config=text, vision_config=vision, image_token_index=151646, video_token_index=151647)
    config.architectures = ["LlavaOnevisionForConditionalGeneration"]
    config.save_pretrained(folder)
    return str(folder)


def _plan(capsys, *overrides: str) -> tuple[int, str, str]:
    code = main(["plan", str(GRID), *overrides])
    out, err = capsys.readouterr()
    return code, out, err


def test_video_grid_plans_as_shipped(capsys) -> None:
    code, out, err = _plan(capsys)
    assert code == 0, err
    cells = len(TASKS) * (1 + len(RATIOS) * 2 + 2)  # baseline, fastvid / holitom x ratios, dycoke, prunevid
    assert f"{cells} cells ({len(TASKS)} unpruned baselines)" in out, out[-500:]
    spec = load_grid(GRID, registry=build_registry(autoload=False))
    assert {c.config["model"]["name"] for c in spec.cells} == {MODEL}
    assert {c.config["task"]["name"] for c in spec.cells} == {"lmms_eval"}
    pruned = {(c.config["task"]["options"]["tasks"][0], c.config["method"]["recipe"], c.config["budget"]) for c in spec.cells if not c.is_baseline}
    expected = set(itertools.product(TASKS, ["fastvid", "holitom"], RATIOS))
    dycoke = dycoke_ttm_count((FRAMES, SIDE, SIDE), 0.3) + 1  # the official TTM count of a 32-frame video + newline
    expected |= {(t, "dycoke", dycoke) for t in TASKS} | {(t, "prunevid", 1.0) for t in TASKS}
    assert pruned == expected
    assert sorted(c.config["task"]["options"]["tasks"][0] for c in spec.cells if c.is_baseline) == sorted(TASKS)
    assert {c.config["task"]["options"]["max_frames_num"] for c in spec.cells} == {FRAMES}  # 32 frames per video
    launcher = spec.raw["launcher"]
    assert launcher["name"] == "slurm" and launcher["options"]["array"] is False
    assert "docs/reproducing.md" in GRID.read_text().splitlines()[3]


@pytest.mark.slow  # plans every cell against the local config
def test_video_grid_model_checks_run_against_a_local_config(tmp_path, capsys) -> None:
    registry = build_registry(autoload=False)
    described = describe_model({"name": MODEL}, registry)
    assert described is None or described[0] is not None
    local = _onevision_config(tmp_path / "model")
    adapter, config = describe_model({"name": local}, registry)
    assert adapter is not None and config.text_config.num_hidden_layers == 28
    code, out, err = _plan(capsys, f"model.name={local}")
    assert code == 0, err
    assert "unpruned baselines" in out
    # the checks are live: a layer beyond the model's depth is refused, naming the problem
    one_cell = (f"model.name={local}", "grid.task.options.tasks=[[mvbench]]", "grid.budget=[0.1]", "include=[]")
    code, _, err = _plan(capsys, *one_cell, "grid.method.recipe=[holitom]", "placement=pre_llm_layer(k=40)")
    assert code != 0 and "has 28 layers" in err, err
