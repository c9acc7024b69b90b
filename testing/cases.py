"""``registry_cases``: one ``pytest.param`` per registered stage and preset, for ``@pytest.mark.parametrize``.

>>> from vtprune.testing import check_case, registry_cases          # doctest: +SKIP
>>> @pytest.mark.parametrize("case", registry_cases())               # doctest: +SKIP
... def test_contract(case):
...     check_case(case)

Every case runs: a stage or preset whose kept count comes from the data (an allocator with ``adaptive_counts``, a
diversity stage with ``exact_counts = False``) gets the relaxed contract (`vtprune.testing.selection_checks`: the count
at most the budget, every other property as for the others).

The default registry autoloads the installed plugins (the ``vtprune`` entry points), so a plugin's test suite
checks its own stages next to every other installed one; pass ``build_registry(autoload=False, plugins=[my_module])``
to check only the built-ins and one module. pytest is imported only when :func:`registry_cases` is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from vtprune.framework import STAGE_KINDS, Registry, default_registry

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
    return [pytest.param(case, id=str(case)) for case in cases]


def check_case(case: StageCase, *, registry: Optional[Registry] = None, **options: Any) -> None:
    """Run the contract for one case (`check_preset` or `check_stage`); ``options`` go to ``check_pipeline``."""
    if case.kind == "preset":
        check_preset(case.name, registry=registry, **options)
    else:
        check_stage(case.kind, case.name, registry=registry, **options)
