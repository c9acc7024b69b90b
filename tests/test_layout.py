"""The suite's layout: tests by package, and collection that does not depend on the name `tests`.

An unrelated installed distribution may ship a top-level package named ``tests`` (lmms-eval's
dependencies do). The suite runs in pytest's importlib mode with helper modules on its
``pythonpath`` (pyproject), so such a package can neither shadow a helper nor be shadowed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("framework", "strategies", "adapters", "experiments")


def test_tests_are_grouped_by_package() -> None:
    for package in PACKAGES:
        assert (ROOT / "tests" / package).is_dir() and (ROOT / package).is_dir()
        assert list((ROOT / "tests" / package).glob("test_*.py")), f"tests/{package} has no test module"
    assert not (ROOT / "tests" / "__init__.py").exists(), "tests/ must not be an importable package"


@pytest.mark.slow  # collects the whole suite in a subprocess
def test_suite_collects_beside_an_installed_package_named_tests(tmp_path: Path) -> None:
    impostor = tmp_path / "tests"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("raise ImportError('the unrelated tests package was imported')\n")
    (impostor / "adapter_fixtures.py").write_text("raise ImportError('shadowed helper')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " tests collected" in result.stdout or " collected" in result.stdout
