"""``registry_cases``: one ``pytest.param`` per registered stage and preset, for ``@pytest.mark.parametrize``.

>>> from vtprune.testing import check_case, registry_cases          # doctest: +SKIP
>>> @pytest.mark.parametrize("case", registry_cases())               # doctest: +SKIP
... def test_contract(case):
...     check_case(case)

The default registry autoloads the installed plugins (the ``vtprune`` entry points), so a plugin's test suite
checks its own stages next to every other installed one; pass ``build_registry(autoload=False, plugins=[my_module])``
to check only the built-ins and one module. pytest is imported only when :func:`registry_cases` is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from vtprune.framework import STAGE_KINDS, Registry, compose, default_registry

from .contracts import check_preset, check_stage, contract_recipes

__all__ = ["CASE_KINDS", "StageCase", "check_case", "registry_cases"]

#: What :func:`registry_cases` enumerates by default: presets, then every stage kind.
CASE_KINDS: tuple[str, ...] = ("preset", *STAGE_KINDS)


@dataclass(frozen=True)
class StageCase:
    """A registered stage (``kind`` one of the stage kinds) or preset (``kind == "preset"``) to check."""

    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}.{self.name}"

    def recipes(self, registry: Optional[Registry] = None) -> list[str]:
        """Its standard pipelines (`vtprune.testing.contracts.contract_recipes`)."""
        return contract_recipes(self.kind, self.name, registry)


def registry_cases(registry: Optional[Registry] = None, kinds: Sequence[str] = CASE_KINDS) -> list[Any]:
    """``pytest.param(StageCase(kind, name), id="kind.name")`` for every registered preset and stage of ``kinds``,
    sorted by kind (in ``kinds`` order) then name. ``registry`` defaults to the installed plugins (autoload)."""
    try:
        import pytest
    except ImportError as error:  # pragma: no cover - pytest is part of the test extra
        raise ImportError("vtprune.testing.registry_cases needs pytest: pip install 'vtprune[test]'") from error
    unknown = sorted(set(kinds) - set(CASE_KINDS))
    if unknown:
        raise ValueError(f"unknown case kinds {unknown}; valid: {', '.join(CASE_KINDS)}")
    registry = default_registry(registry)
    cases = []
    for kind in kinds:
        table = registry.presets if kind == "preset" else registry.stages[kind]
        cases += [StageCase(kind, name) for name in sorted(table)]
    params = []
    for case in cases:
        reason = _adaptive_reason(case, registry)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(case, id=str(case), marks=marks))
    return params


def _adaptive_reason(case: StageCase, registry: Registry) -> str:
    """Why the exact-count contract does not apply: the case's kept count comes from the data (an allocator with
    ``adaptive_counts``, or a stage declaring ``exact_counts = False`` on its class); "" when it applies. Such
    stages carry their own tests against the official rules (SparseVLM: tests/strategies/test_sparsevlm.py)."""
    if case.kind == "preset":
        stages = compose(case.name, registry=registry).stages
    else:
        stages = (registry.stages[case.kind][case.name].obj,)
    for stage in stages:
        cls = stage if isinstance(stage, type) else type(stage)
        if cls.__dict__.get("adaptive_counts") is True or cls.__dict__.get("exact_counts") is False:
            return f"{case}: adaptive kept count ({cls.__name__}); the exact-count contract does not apply"
    return ""


def check_case(case: StageCase, *, registry: Optional[Registry] = None, **options: Any) -> None:
    """Run the contract for one case (`check_preset` or `check_stage`); ``options`` go to ``check_pipeline``."""
    if case.kind == "preset":
        check_preset(case.name, registry=registry, **options)
    else:
        check_stage(case.kind, case.name, registry=registry, **options)
