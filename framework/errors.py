"""Error types with messages that name the problem and the valid choices."""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = [
    "VtpruneError",
    "UnknownNameError",
    "RegistrationError",
    "RecipeError",
    "ParameterError",
    "BudgetError",
    "MissingSignalError",
    "nearest",
]


class VtpruneError(ValueError):
    """Base class of every error vtprune raises on bad input."""


def nearest(name: str, choices: Iterable[str]) -> str | None:
    """The choice closest to ``name`` (difflib ratio), or None when nothing is close."""
    matches = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


class UnknownNameError(VtpruneError, KeyError):
    """A name that is not registered for its kind."""

    def __init__(self, kind: str, name: str, choices: Iterable[str], hint: str | None = None) -> None:
        """``choices``: the valid spellings (listed once each, sorted); ``hint``: the suggestion
        to print (default: the nearest choice, quoted)."""
        self.kind, self.name, self.choices = kind, name, sorted(set(choices))
        if hint is None:
            closest = nearest(name, self.choices)
            hint = repr(closest) if closest else None
        suggestion = f" Did you mean {hint}?" if hint else ""
        message = f"unknown {kind} {name!r}.{suggestion} Valid {kind} names: {', '.join(self.choices)}"
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class RegistrationError(VtpruneError):
    """A plugin registered something invalid or a name that is already taken."""


class RecipeError(VtpruneError):
    """A malformed recipe; the message points at the position."""

    def __init__(self, recipe: str, position: int, problem: str) -> None:
        self.recipe, self.position, self.problem = recipe, position, problem
        pointer = " " * (position + 2) + "^"
        super().__init__(f"{problem} at position {position} of the recipe:\n  {recipe}\n{pointer}")


class ParameterError(VtpruneError):
    """An unknown or ill-typed stage parameter."""


class BudgetError(VtpruneError):
    """A budget that is not a positive int or a float in (0, 1]."""


class MissingSignalError(VtpruneError):
    """A stage needs a `Signals` field that the pruning point did not provide."""
