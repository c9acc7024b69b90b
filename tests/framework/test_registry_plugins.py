"""The plugin mechanism: entry-point plugins, clashes, catalog, autoload switch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from vtprune.framework import (
    RegistrationError,
    RelevanceScorer,
    build_registry,
    catalog,
    compose,
    hookimpl,
)
from vtprune.framework.signals import SIGNAL_DESCRIPTIONS, signal_names

from vtprune.testing import make_signals

PLUGIN_PACKAGE = Path(__file__).resolve().parents[1] / "plugin_package"


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """Install the one-file plugin package into a private folder (no change to the environment)."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("plugin") / "package"  # built from a copy: no build/ or egg-info in tests/
    shutil.copytree(PLUGIN_PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet", "--target", str(target), str(source)],
        check=True,
    )
    sys.path.insert(0, str(target))
    yield target
    sys.path.remove(str(target))
    sys.modules.pop("vtprune_example_plugin", None)


@pytest.mark.slow  # pip-installs the example plugin in a subprocess
def test_third_party_package_adds_a_stage_through_its_entry_point(installed_plugin) -> None:
    registry = build_registry(autoload=True)
    assert "token_norm" in registry.stages["relevance"]
    assert "vtprune-example-plugin" in registry.stages["relevance"]["token_norm"].source
    pipeline = compose("token_norm(power=2.0)+critical+fps", registry=registry)
    selection = pipeline.select(make_signals([10, 7]), 4)
    assert selection.counts.tolist() == [4, 4]
    assert compose("norm_fps", registry=registry).relevance.name == "token_norm"
    assert compose(str(pipeline), registry=registry) == pipeline
    # the default registry sees newly installed entry points too
    assert compose("token_norm+critical+fps").relevance.name == "token_norm"
    # autoload off: only the built-ins
    assert "token_norm" not in build_registry(autoload=False).stages["relevance"]


@dataclass(frozen=True, eq=False)
class _Clash(RelevanceScorer):
    name: ClassVar[str] = "prompt_cosine"
    description: ClassVar[str] = "clashes with the built-in"

    def score(self, signals):
        return None


class _ClashPlugin:
    @hookimpl
    def vtprune_register_stages(self, registry) -> None:
        registry.add_stage(_Clash)


def test_clash_names_both_plugins() -> None:
    with pytest.raises(RegistrationError) as info:
        build_registry(autoload=False, plugins=[_ClashPlugin()])
    message = str(info.value)
    assert "prompt_cosine" in message and "vtprune.strategies.plugin" in message and "_ClashPlugin" in message


def test_invalid_stage_is_rejected_at_registration() -> None:
    class NoDefault(RelevanceScorer):
        name = "no_default"
        description = "bad"

        def __init__(self, power: float) -> None:
            self.power = power

    class Plugin:
        @hookimpl
        def vtprune_register_stages(self, registry) -> None:
            registry.add_stage(NoDefault)

    with pytest.raises(RegistrationError, match="needs a default"):
        build_registry(autoload=False, plugins=[Plugin()])


def test_catalog_lists_every_stage_and_preset(registry) -> None:
    entries = catalog(registry)
    names = {(e.kind, e.name) for e in entries}
    for kind, table in registry.stages.items():
        for name in table:
            assert (kind, name) in names
    for name in registry.presets:
        assert ("preset", name) in names
    by_name = {(e.kind, e.name): e for e in entries}
    cosine = by_name[("relevance", "prompt_cosine")]
    assert cosine.params["pool"] == ("'mean' | 'max' | 'token_max'", "mean")
    assert cosine.requires == ("prompt",)
    assert by_name[("preset", "zspaprune")].params["recipe"][1].startswith("prompt_cosine(pool=mean)")
    assert all(entry.description for entry in entries)


def test_registry_is_frozen_after_build(registry) -> None:
    with pytest.raises(RegistrationError, match="frozen"):
        registry.add_preset("late", "critical+fps", "too late")


def test_every_signal_is_documented() -> None:
    assert set(signal_names()) == set(SIGNAL_DESCRIPTIONS)


def test_missing_signal_names_providers() -> None:
    from vtprune.framework import MissingSignalError, Signals

    pipeline = compose("zspaprune")
    with pytest.raises(MissingSignalError, match="'prompt'.*prompt_cosine.*placements.*pre_llm"):
        pipeline.select(Signals(visual=torch.randn(1, 4, 3)), 2)
