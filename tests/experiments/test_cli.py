"""The command line: `vtprune list` and the selection example."""

from __future__ import annotations

import json

from vtprune.cli import main


def test_list_prints_the_catalog(capsys) -> None:
    assert main(["list", "--no-plugins"]) == 0
    out = capsys.readouterr().out
    for expected in ("relevance:", "prompt_cosine", "fps", "preset:", "zspaprune", "placement:", "schedule"):
        assert expected in out


def test_list_json(capsys) -> None:
    assert main(["list", "--json", "--kind", "preset", "--no-plugins"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert {e["name"] for e in entries} >= {"zspaprune", "zspaprune_kmeans"}


def test_bad_recipe_is_one_clear_line(capsys) -> None:
    assert main(["select-example", "critical+fsp"]) == 2
    assert "Did you mean 'fps'" in capsys.readouterr().err


def test_select_example_runs(capsys) -> None:
    assert main(["select-example", "zspaprune", "--budget", "6"]) == 0
    assert "kept 6" in capsys.readouterr().out


def test_organism_train_passes_every_argument_to_the_trainer(monkeypatch) -> None:
    import vtprune.experiments.organism.train as trainer

    seen: list[list[str]] = []
    monkeypatch.setattr(trainer, "main", lambda argv: seen.append(argv) or 0)
    assert main(["organism", "train", "--out", "run", "--steps", "3"]) == 0
    assert seen == [["--out", "run", "--steps", "3"]]
    config = trainer.parse_args(seen[0])
    assert (config.out, config.steps) == ("run", 3)


def test_unknown_arguments_are_still_an_error(capsys) -> None:
    import pytest

    with pytest.raises(SystemExit):
        main(["list", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
