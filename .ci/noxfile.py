"""The version matrix: ``nox -s floor`` / ``nox -s newest`` / ``nox -s tests-3.11`` / ``nox -s tests-3.13``.

* ``floor``: every floor that pyproject.toml declares (``dependencies`` and the ``test`` and ``slurm``
  extras, ``name>=X`` -> ``name==X``; ``build-system.requires`` too: the project is installed with
  that setuptools and no build isolation), then the fast suite. One exception: torch, see below.
* ``newest``: the newest release of every dependency the declared ranges allow, then the fast suite.
* ``tests``: the newest set on another interpreter (3.11, 3.13).

torch: PyPI's Linux torch wheels are CUDA builds (several GB). Every session therefore installs
torch first from ``$VTPRUNE_TORCH`` (default ``torch==2.13.0``, the CPU wheel this project's
machines carry in pip's find-links) and holds it with a constraint, so nothing upgrades it. So the
``floor`` session runs torch 2.13.0, not the declared floor: on a machine that can fetch it, run
``VTPRUNE_TORCH=torch==2.6.0 nox -s floor`` to test the declared torch floor exactly. For a Python
other than 3.11 the default spec would pull a CUDA build, so ``tests-3.13`` skips unless
``VTPRUNE_TORCH`` is set (a path to a CPU wheel for that interpreter, or a spec on a GPU node).

The suite run is ``pytest -m "not slow"`` without tests/test_packaging.py (those build wheels and
venvs of their own; ``make test`` runs them). Extra pytest arguments: ``nox -s floor -- -x``.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import nox

__all__ = ["floor", "newest", "tests", "floor_pins"]

ROOT = Path(__file__).resolve().parents[1]  # the repository (this file lives in .ci/, outside the package)
#: the torch every session installs first (the CPU wheel in this project's find-links)
DEFAULT_TORCH = "torch==2.13.0"
#: the interpreter the default torch wheel is built for
DEFAULT_PYTHON = "3.11"
#: extras whose floors the ``floor`` session pins (``eval`` is documented apart: lmms-eval pulls torchvision)
PINNED_EXTRAS = ("test", "slurm", "video")
PYTEST_ARGS = ("-q", "-p", "no:cacheprovider", "-m", "not slow", "--deselect", "tests/test_packaging.py")

nox.options.sessions = ["floor", "newest"]
nox.options.reuse_existing_virtualenvs = False

_FLOOR = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)")


def floor_pins(requirements: list[str]) -> list[str]:
    """``name==X`` for each ``name>=X[,...]`` requirement; a requirement without a ``>=`` floor
    raises ValueError naming it (every dependency must declare its floor)."""
    pins = []
    for requirement in requirements:
        match = _FLOOR.match(requirement)
        if match is None:
            raise ValueError(f"requirement {requirement!r} declares no '>=' floor; every dependency must")
        pins.append(f"{match.group(1)}=={match.group(2)}")
    return pins


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _torch(session: nox.Session) -> str:
    """Install torch from ``$VTPRUNE_TORCH`` and return a constraints file that holds it. Every session calls
    this first; it also moves to the repository root (nox starts in the noxfile's folder, .ci/)."""
    session.chdir(str(ROOT))
    spec = os.environ.get("VTPRUNE_TORCH")
    if spec is None:
        if session.python not in (None, DEFAULT_PYTHON):
            session.skip(
                f"no CPU torch wheel for Python {session.python} here: set VTPRUNE_TORCH to a CPU wheel "
                f"(path) for it, or to a torch spec on a machine where the CUDA build from PyPI is acceptable"
            )
        spec = DEFAULT_TORCH
    session.install(spec)
    # the installed build, local label included (2.13.0+cpu): read from its metadata, torch is not imported
    probe = "from importlib.metadata import version; print(version('torch'))"
    version = session.run("python", "-c", probe, silent=True).strip().splitlines()[-1]
    constraints = Path(session.create_tmp()) / "torch-constraint.txt"
    constraints.write_text(f"torch=={version}\n")
    return str(constraints)


def _pytest(session: nox.Session) -> None:
    session.run("python", "-m", "pip", "list", "--format=freeze")
    session.run("python", "-m", "pytest", *PYTEST_ARGS, *session.posargs)


@nox.session(python=DEFAULT_PYTHON)
def floor(session: nox.Session) -> None:
    """Every declared floor pinned exactly (torch: see the module docstring), then the fast suite."""
    project = _pyproject()
    constraints = _torch(session)
    extras = project["project"]["optional-dependencies"]
    dependencies = project["project"]["dependencies"]
    (torch_floor,) = floor_pins([r for r in dependencies if r.startswith("torch")])
    held = Path(constraints).read_text().strip()
    session.log(f"torch: declared floor {torch_floor}, running {held} (VTPRUNE_TORCH; see docs/reproducing.md)")
    requirements = [r for r in dependencies if not r.startswith("torch")]
    for name in PINNED_EXTRAS:
        requirements += extras[name]
    pins = sorted(set(floor_pins(requirements)))
    build = floor_pins(project["build-system"]["requires"])
    session.log(f"floor pins: {' '.join(pins + build)}")
    session.install("-c", constraints, *pins, *build)
    session.install("-c", constraints, "--no-deps", "--no-build-isolation", ".")
    session.run("python", "-m", "pip", "check", success_codes=[0, 1])  # shows torch's own setuptools pin
    _pytest(session)


def _newest(session: nox.Session) -> None:
    constraints = _torch(session)
    session.install("-c", constraints, "--upgrade", ".[test,slurm,video]")
    _pytest(session)


@nox.session(python=DEFAULT_PYTHON)
def newest(session: nox.Session) -> None:
    """The newest release of every dependency (torch held at ``$VTPRUNE_TORCH``), then the fast suite."""
    _newest(session)


@nox.session(python=["3.11", "3.13"])
def tests(session: nox.Session) -> None:
    """The newest set on Python 3.11 and 3.13 (3.13 skips without ``$VTPRUNE_TORCH``)."""
    _newest(session)
