"""End to end on a real (tiny, random) LLaVA from tests/adapter_fixtures.py: a grid over budgets and
placements with the JSONL task, the real adapters and framework.prune."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from adapter_fixtures import IMAGE_SIZE, single_thread, tiny_llava, tiny_llava_processor
from vtprune.experiments.config import load_grid
from vtprune.experiments.results import ResultsDir
from vtprune.experiments.runner import run_grid

one_thread = pytest.fixture(autouse=True)(single_thread)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny_llava")
    tiny_llava().save_pretrained(root / "model")
    tiny_llava_processor().save_pretrained(root / "model")
    rows = []
    for index in range(2):
        pixels = np.random.default_rng(index).integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"img{index}.png")
        rows.append({"id": f"s{index}", "image": f"img{index}.png", "question": "w5 w6 w7", "answers": ["w9"]})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_grid_on_tiny_llava(tiny_dir, tmp_path) -> None:
    config = {
        "name": "tiny",
        "base": {
            "model": {"name": str(tiny_dir / "model"), "prompt_template": "<image> {question}", "device": "cpu"},
            "task": {"name": "jsonl", "options": {"path": str(tiny_dir / "data.jsonl"), "metric": "exact_match"}},
            "method": {"recipe": "zspaprune"},
            "generation": {"max_new_tokens": 2},
            "tracking": {"mode": "disabled", "log_images": 1},
            "output_dir": str(tmp_path / "out"),
        },
        "grid": {"budget": [4, 8], "placement": ["pre_llm", "layer(k=2)"]},
        "include": [{"method.recipe": "pdrop", "placement": "schedule(layers=[1,3],ratio=0.5)", "budget": 8}],
    }
    spec = load_grid(config)
    assert len(spec.cells) == 6
    with pytest.raises(Exception, match="4 layers"):
        load_grid(config, ["grid.placement=['layer(k=7)']"])
    summary = run_grid(spec, progress=False)
    states = ResultsDir(spec.output_dir).states()
    assert not summary.failed, {k: s.get("traceback") for k, s in states.items() if s["status"] == "failed"}
    by_label = {(s["label"], s["config"]["budget"]): s["metrics"] for s in states.values()}
    unpruned = by_label[("unpruned", 64)]
    assert unpruned["tokens_kept"] == unpruned["tokens_visual"] == 16 and unpruned["flops_ratio"] == 1
    pre = by_label[("zspaprune@pre_llm", 4)]
    assert pre["tokens_kept"] == 4 and pre["tokens_kept_layer/0"] == 4 and pre["fidelity"] is not None
    layer = by_label[("zspaprune@layer(k=2)", 8)]
    assert layer["tokens_kept_layer/2"] == 8 and pre["flops_ratio"] < layer["flops_ratio"] < 1
    schedule = by_label[("pdrop@schedule(layers=[1,3],ratio=0.5)", 8)]
    assert (schedule["tokens_kept_layer/1"], schedule["tokens_kept_layer/3"], schedule["tokens_kept"]) == (8, 4, 4)
    assert all(m["prefill_ms"] > 0 for m in by_label.values())
    key = next(k for k, s in states.items() if s["label"] == "zspaprune@pre_llm" and s["config"]["budget"] == 4)
    rows = ResultsDir(spec.output_dir).samples(key)
    assert [len(r["kept_indices"][0]) for r in rows] == [4, 4]
    assert list(ResultsDir(spec.output_dir).overlay_dir(key).glob("*.png"))
