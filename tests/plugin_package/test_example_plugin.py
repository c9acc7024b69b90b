"""The example plugin's own tests, written as a plugin author writes them: with the public kit `vtprune.testing`.

They run whether or not the package is installed: the registry is built from the module itself
(``plugins=[vtprune_example_plugin]``); an installed plugin is also found by ``registry_cases()`` (autoload).
"""

from __future__ import annotations

import pytest
import torch

import vtprune_example_plugin
from vtprune.framework import build_registry, compose
from vtprune.testing import check_case, check_pipeline, check_preset, check_stage, make_signals, registry_cases

pytestmark = pytest.mark.filterwarnings("ignore:Number of distinct clusters")  # k-means on the kit's clustered signals

REGISTRY = build_registry(autoload=False, plugins=[vtprune_example_plugin])


def test_token_norm_scores_are_the_token_norms():
    signals = make_signals([5, 3], seed=1)
    scores = vtprune_example_plugin.TokenNorm(power=2.0).score(signals)
    torch.testing.assert_close(scores, signals.visual.norm(dim=-1) ** 2)


def test_token_norm_meets_the_selection_contract():
    check_stage("relevance", "token_norm", registry=REGISTRY)


def test_the_stage_class_can_be_checked_before_registration():
    check_stage(vtprune_example_plugin.TokenNorm, shapes=((9, 6),), seeds=(0,))


def test_token_norm_with_a_parameter_and_other_stages():
    check_pipeline("token_norm(power=0.5)+critical+kmeans+split(critical=0.3)", registry=REGISTRY)


def test_norm_fps_preset_meets_the_selection_contract():
    check_preset("norm_fps", registry=REGISTRY)
    assert compose("norm_fps", registry=REGISTRY).relevance.name == "token_norm"


@pytest.mark.parametrize("case", registry_cases(REGISTRY, kinds=("relevance", "preset")))
def test_every_relevance_stage_and_preset_next_to_ours(case):
    check_case(case, registry=REGISTRY, shapes=((9, 6),), seeds=(0,))
