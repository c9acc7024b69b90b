"""Shared fixtures: the registry. Seeded signal builders are in the public kit (`vtprune.testing`);
helper modules shared by several test packages are in tests/helpers (on pytest's ``pythonpath``)."""

from __future__ import annotations

import pytest

from vtprune.framework import build_registry

__all__ = ["registry"]


@pytest.fixture(scope="session")
def registry():
    """The built-in registry, without third-party entry points (reproducible)."""
    return build_registry(autoload=False)
