"""The papers' grids (experiments/configs/paper_*.yaml) validate with ``vtprune plan`` alone: no model loads.

What ``vtprune plan`` checks offline: the grid's keys and values, the recipes and stage parameters,
the task options and the launcher. The checks that need the model's config file (which adapter,
whether it implements each recipe's placement and signals, the layer count) read the config with
``local_files_only``: for a hub id that is not in the local cache they are deferred to run time.
So each grid is planned twice: as shipped (hub id), and with ``model.name`` pointing at a local
config of the published architecture (built here from transformers' config classes, no weights),
where those model checks do run, and are shown to catch a recipe the model cannot take.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from vtprune.cli import main
from vtprune.experiments.config import CONFIG_DIR, load_grid
from vtprune.experiments.models import describe_model
from vtprune.framework import build_registry

BENCHMARKS = ["gqa", "mmbench_en_dev", "mme", "pope", "scienceqa_img", "vqav2_val", "textvqa_val", "mmstar"]
GRIDS = {
    "paper_llava15.yaml": ("llava-hf/llava-1.5-7b-hf", [64, 128, 192], ["zspaprune", "cdpruner", "divprune", "fastv"]),
    "paper_qwen25vl.yaml": ("Qwen/Qwen2.5-VL-7B-Instruct", [0.1, 0.2, 0.3], ["zspaprune", "divprune", "fastv"]),
}


def _llava_config(folder: Path) -> str:
    """LLaVA-1.5-7B's config: transformers' LlavaConfig defaults are that model (CLIP ViT-L/14-336, 32-layer 4096-wide Llama)."""
    from transformers import LlavaConfig

    config = LlavaConfig(image_token_id=32000)
    assert (config.text_config.num_hidden_layers, config.vision_config.image_size) == (32, 336)
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(folder)
    return str(folder)


def _qwen_config(folder: Path) -> str:
    """Qwen2.5-VL-7B-Instruct's dimensions (text 3584 wide, 28 layers, 28 heads / 4 KV heads; vision depth 32)."""
    from transformers import Qwen2_5_VLConfig

    text = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944, vocab_size=152064)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(depth=32, hidden_size=1280, out_hidden_size=3584))
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    config.save_pretrained(folder)
    return str(folder)


LOCAL_CONFIGS = {"paper_llava15.yaml": _llava_config, "paper_qwen25vl.yaml": _qwen_config}


def _plan(capsys, path: Path, *overrides: str) -> tuple[int, str, str]:
    code = main(["plan", str(path), *overrides])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow  # plans 104 + 80 cells twice (about 10 s each on 2 cores)
@pytest.mark.parametrize("name", sorted(GRIDS))
def test_paper_grid_plans_as_shipped(name: str, capsys) -> None:
    path = CONFIG_DIR / name
    model, budgets, methods = GRIDS[name]
    code, out, err = _plan(capsys, path)
    assert code == 0, err
    cells = len(BENCHMARKS) * (1 + len(budgets) * len(methods))  # one unpruned baseline per benchmark
    assert f"{cells} cells ({len(BENCHMARKS)} unpruned baselines)" in out, out[-500:]

    spec = load_grid(path, registry=build_registry(autoload=False))
    assert {c.config["model"]["name"] for c in spec.cells} == {model}
    assert {c.config["task"]["name"] for c in spec.cells} == {"lmms_eval"}
    pruned = {(c.config["task"]["options"]["tasks"][0], c.config["budget"], c.config["method"]["recipe"]) for c in spec.cells if not c.is_baseline}
    assert pruned == set(itertools.product(BENCHMARKS, budgets, methods))
    baselines = sorted(c.config["task"]["options"]["tasks"][0] for c in spec.cells if c.is_baseline)
    assert baselines == sorted(BENCHMARKS)
    # Slurm, one job per cell, resumable (finished cells are skipped on the next `vtprune run`)
    launcher = spec.raw["launcher"]
    assert launcher["name"] == "slurm" and launcher["options"]["array"] is False
    assert "docs/reproducing.md" in path.read_text().splitlines()[3]


@pytest.mark.slow  # plans every cell against the local config
@pytest.mark.parametrize("name", sorted(GRIDS))
def test_paper_grid_model_checks_run_against_a_local_config(name: str, tmp_path, capsys) -> None:
    model = GRIDS[name][0]
    registry = build_registry(autoload=False)
    # As shipped, the model checks need the hub config: deferred unless it is in the local cache.
    described = describe_model({"name": model}, registry)
    assert described is None or described[0] is not None
    local = LOCAL_CONFIGS[name](tmp_path / "model")
    adapter, config = describe_model({"name": local}, registry)
    assert adapter is not None and json.loads(Path(local, "config.json").read_text())["architectures"] == config.architectures
    code, out, err = _plan(capsys, CONFIG_DIR / name, f"model.name={local}")
    assert code == 0, err
    assert "unpruned baselines" in out
    # the checks are live: a recipe the model's adapter cannot take is refused, naming the problem
    one_cell = (f"model.name={local}", "grid.task.options.tasks=[[pope]]", f"grid.budget=[{GRIDS[name][1][0]}]")
    if name == "paper_qwen25vl.yaml":
        code, _, err = _plan(capsys, CONFIG_DIR / name, *one_cell, "grid.method.recipe=[cdpruner]")
        assert code != 0 and "'qwen2_vl' adapter" in err and "pre_llm_clip" in err, err
    else:
        code, _, err = _plan(capsys, CONFIG_DIR / name, *one_cell, "grid.method.recipe=[fastv]", "placement=layer(k=40)")
        assert code != 0 and "has 32 layers" in err, err
