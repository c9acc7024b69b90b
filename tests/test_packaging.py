"""The wheel carries every sub-package and imports as vtprune.* outside the source tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds a wheel and pip-installs it in subprocesses

ROOT = Path(__file__).resolve().parent.parent


def _source_packages() -> set[str]:
    """Every folder of the source tree that is a package, as its import name."""
    names = {"vtprune"}
    for init in ROOT.rglob("__init__.py"):
        relative = init.parent.relative_to(ROOT)
        if relative.parts and relative.parts[0] in {"tests", "build", "dist", ".venv", "benchmarks"}:
            continue
        if any(part.startswith(".") for part in relative.parts):
            continue
        if relative.parts:
            names.add("vtprune." + ".".join(relative.parts))
    return names


#: What a build writes into the folder it builds (setuptools' ``build/`` and ``*.egg-info``).
BUILD_LEFTOVERS: tuple[str, ...] = ("build", "*.egg-info")
#: Not copied into the temporary build folder.
NOT_SOURCES: tuple[str, ...] = (".git", ".venv", "build", "dist", "*.egg-info", "results", "__pycache__", ".pytest_cache")


def _leftovers() -> set[str]:
    return {path.name for pattern in BUILD_LEFTOVERS for path in ROOT.glob(pattern)}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, set[str], set[str]]:
    """(the wheel, build leftovers in the source tree before, after): built from a copy of the
    source tree in a temporary folder, so the tree gets no ``build/`` or ``*.egg-info``."""
    before = _leftovers()
    source = tmp_path_factory.mktemp("source") / "vtprune"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel_file,) = out.glob("vtprune-*.whl")
    return wheel_file, before, _leftovers()


@pytest.fixture(scope="module")
def wheel(built) -> Path:
    return built[0]


def test_building_leaves_the_source_tree_clean(built) -> None:
    _, before, after = built
    assert after <= before, f"the build wrote {sorted(after - before)} into {ROOT}"


def test_wheel_contains_every_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = {"/".join(n.split("/")[:-1]).replace("/", ".") for n in names if n.endswith("/__init__.py")}
    missing = _source_packages() - in_wheel
    assert not missing, f"packages missing from the wheel (add them to pyproject.toml): {sorted(missing)}"
    assert "vtprune/cli.py" in names
    assert not any(n.startswith("vtprune/tests/") for n in names)


def test_wheel_imports_outside_the_source_tree(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
        check=True,
    )
    code = (
        "import vtprune, vtprune.framework, vtprune.strategies, vtprune.adapters, vtprune.experiments;"
        "from vtprune.framework import compose;"
        "assert vtprune.__file__.startswith(%r), vtprune.__file__;"
        "print(compose('zspaprune'))" % str(target)
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "prompt_cosine(pool=mean)+critical+fps+split(critical=0.6)+pre_llm"
