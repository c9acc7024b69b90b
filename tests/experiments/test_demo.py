"""The demo: the organism pruned through `framework.prune` matches the masked reference, and the demo
grid runs end to end on a reduced set (one seed, two budgets)."""

from __future__ import annotations

import json

import pytest
import torch

from vtprune import framework
from vtprune.experiments.organism import WEIGHTS_DIR, load_organism
from vtprune.experiments.organism.processor import build_prompt
from vtprune.experiments.organism.task import make_split

from adapter_fixtures import generation_positions, merged_embeddings, removed_by_layer

pytestmark = pytest.mark.skipif(not (WEIGHTS_DIR / "config.json").exists(), reason="organism weights not shipped yet")


@pytest.fixture(scope="module")
def organism():
    torch.set_num_threads(1)
    model, processor = load_organism()
    samples = make_split("test", 24, start=500)
    inputs = processor(images=[s.image for s in samples], text=[build_prompt(s.question) for s in samples], return_tensors="pt", padding=True)
    return model, processor, samples, inputs


@pytest.mark.parametrize("recipe", ["zspaprune", "zspaprune_max", "divprune", "random"])
def test_pruned_answers_equal_the_masked_reference(organism, recipe) -> None:
    model, processor, samples, inputs = organism
    with torch.no_grad(), framework.prune(model, recipe, budget=0.25) as handle:
        pruned = model(**inputs).logits[:, -1]  # (B, V) next-token logits = the answer word
    result = handle.last_selection
    assert result.counts.tolist() == [16] * len(samples)
    batch, length = inputs["input_ids"].shape
    removed = removed_by_layer(result, batch, length, model.config.text_config.num_hidden_layers)[0]
    with torch.no_grad():
        embeds = merged_embeddings(model, inputs)
        mask = inputs["attention_mask"] * (~removed).long()  # dropped tokens masked out of attention
        reference = model.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=generation_positions(inputs["attention_mask"])
        ).last_hidden_state[:, -1]
        reference = model.lm_head(reference)
    torch.testing.assert_close(pruned, reference, atol=1e-4, rtol=1e-4)
    assert torch.equal(pruned.argmax(-1), reference.argmax(-1))


def test_demo_grid_runs_on_a_reduced_set(tmp_path, monkeypatch, capsys) -> None:
    from vtprune.cli import main

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = ["demo", "seeds=[0]", "grid.budget=[0.5,0.1]", "task.limit=16", "generation.batch_size=16", "--out", str(tmp_path / "demo"), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out and "| unpruned |" in out and "zspaprune" in out
    assert (tmp_path / "demo" / "report" / "report.md").exists()
    assert list((tmp_path / "demo" / "report").glob("*.png"))
    states = [json.loads(line) for line in (tmp_path / "demo" / "cells.jsonl").read_text().splitlines() if line.strip()]
    assert states and all(s.get("status") in ("running", "done") for s in states)
    # a rerun resumes: nothing left to do
    assert main(args) == 0
    assert " 0 done," in capsys.readouterr().out
