"""Hypothesis strategies for property-based contract tests (hypothesis is imported only when they are called).

>>> from hypothesis import given, settings                          # doctest: +SKIP
>>> from vtprune.testing import check_selection, compose_for_contract, ragged_signals
>>> from vtprune.testing.properties import contract_inputs
>>> @given(contract_inputs())                                        # doctest: +SKIP
... def test_my_stage(case):
...     lengths, budget, seed = case
...     check_selection(compose_for_contract("token_norm+critical+fps"), ragged_signals(lengths, seed=seed), budget)
"""

from __future__ import annotations

from typing import Any

__all__ = ["budgets", "contract_inputs", "require_hypothesis"]


def require_hypothesis() -> Any:
    """The ``hypothesis.strategies`` module, or an ImportError saying how to install it."""
    try:
        from hypothesis import strategies
    except ImportError as error:
        raise ImportError(
            "vtprune.testing.properties needs hypothesis (a test extra): pip install 'vtprune[test]' "
            "or pip install hypothesis; the deterministic checks (check_pipeline, check_stage) work without it"
        ) from error
    return strategies


def budgets(max_tokens: int = 40) -> Any:
    """Budgets: an int in 1..``max_tokens`` or a float in [0.01, 1.0]."""
    st = require_hypothesis()
    return st.one_of(st.integers(min_value=1, max_value=max_tokens), st.floats(min_value=0.01, max_value=1.0))


def contract_inputs(max_rows: int = 4, max_tokens: int = 24, max_budget: int = 40) -> Any:
    """Tuples ``(lengths, budget, seed)``: 1..``max_rows`` rows of 1..``max_tokens`` real tokens, a budget from
    :func:`budgets`, a seed in 0..65536 (for :func:`vtprune.testing.ragged_signals`)."""
    st = require_hypothesis()
    return st.tuples(
        st.lists(st.integers(min_value=1, max_value=max_tokens), min_size=1, max_size=max_rows),
        budgets(max_budget),
        st.integers(min_value=0, max_value=2**16),
    )
