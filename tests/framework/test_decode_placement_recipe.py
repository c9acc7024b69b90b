"""Recipe rules of placement ``decode``: it inherits the recipe's prefill placement, round-trips, validates."""

from __future__ import annotations

import pytest

from vtprune.framework import compose
from vtprune.framework.errors import ParameterError, VtpruneError


def test_inherits_the_preset_placement_and_round_trips():
    pipeline = compose("fastv+decode(keep=4)")
    assert pipeline.placement.prefill == "layer(k=2)"
    assert pipeline.placement.drops(0.5) == compose("fastv").placement.drops(0.5)
    assert compose(str(pipeline)) == pipeline
    assert compose("zspaprune+decode(keep=0.5)").placement.prefill == "pre_llm"


def test_explicit_prefill_wins_and_provides_follow_it():
    pipeline = compose("attention+critical+fps+decode(prefill='schedule(layers=[1,3],ratio=0.5)')")
    assert [d.layer for d in pipeline.placement.drops(0.5)] == [1, 3]
    assert "attention" in pipeline.placement.provides


@pytest.mark.parametrize(
    "recipe",
    [
        "decode(prefill='bogus')",
        "decode(prefill='decode')",
        "decode(prefill='layer(q=1)')",
        "decode(layer=0)",
        "decode(keep=1.5)",
        "decode(policy=nope)",
    ],
)
def test_bad_parameters_raise(recipe):
    with pytest.raises((ParameterError, VtpruneError)):
        compose(recipe)
