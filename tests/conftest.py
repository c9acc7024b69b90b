"""Shared fixtures: the registry. The seeded signal builders live in the public kit (`vtprune.testing`);
``make_signals`` is re-exported here for the tests that import it from conftest."""

from __future__ import annotations

import pytest

from vtprune.framework import build_registry
from vtprune.testing import make_signals

__all__ = ["make_signals", "registry"]


@pytest.fixture(scope="session")
def registry():
    """The built-in registry, without third-party entry points (reproducible)."""
    return build_registry(autoload=False)
