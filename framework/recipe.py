"""The recipe grammar: stage names joined by ``+``, each with optional parameters.

::

    recipe := term ("+" term)*
    term   := [kind "."] name ["(" [param ("," param)*] ")"]
    param  := identifier "=" value
    value  := a Python literal (number, 'string', [list], {dict}, (tuple), True/False/None)
              or a bare word such as ``mean`` (read as a string)

Whitespace between tokens is ignored. Parsing never executes code: values go through
``ast.literal_eval`` only.

>>> [(t.name, t.params) for t in parse_recipe("prompt_cosine(pool=max)+critical+split(critical=0.5)")]
[('prompt_cosine', {'pool': 'max'}), ('critical', {}), ('split', {'critical': 0.5})]
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import RecipeError

__all__ = ["Term", "parse_recipe", "format_value", "format_term"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BARE_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_CLOSERS = {"(": ")", "[": "]", "{": "}"}


@dataclass(frozen=True)
class Term:
    """One ``+``-separated term: a stage or preset name, an optional kind qualifier, parameters."""

    name: str
    kind: Optional[str] = None
    params: dict[str, Any] = field(default_factory=dict)
    position: int = 0


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def fail(self, problem: str, position: Optional[int] = None) -> RecipeError:
        return RecipeError(self.text, self.pos if position is None else position, problem)

    def match(self, pattern: re.Pattern[str], what: str) -> str:
        self.skip_space()
        found = pattern.match(self.text, self.pos)
        if not found:
            got = repr(self.text[self.pos]) if self.pos < len(self.text) else "the end"
            raise self.fail(f"expected {what}, found {got}")
        self.pos = found.end()
        return found.group(0)

    def expect(self, char: str) -> None:
        if self.peek() != char:
            got = repr(self.peek()) if self.peek() else "the end"
            raise self.fail(f"expected {char!r}, found {got}")
        self.pos += 1

    def value_text(self) -> tuple[str, int]:
        """The raw text of one parameter value: up to the next top-level ',' or ')'."""
        self.skip_space()
        start, stack, quote = self.pos, [], ""
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if quote:
                if char == "\\":
                    self.pos += 1
                elif char == quote:
                    quote = ""
            elif char in "'\"":
                quote = char
            elif char in _CLOSERS:
                stack.append(_CLOSERS[char])
            elif stack and char == stack[-1]:
                stack.pop()
            elif char in ")]}":
                if not stack and char == ")":
                    break
                raise self.fail(f"unbalanced {char!r}")
            elif char == "," and not stack:
                break
            self.pos += 1
        if quote:
            raise self.fail("unterminated string", start)
        if stack:
            raise self.fail(f"missing {stack[-1]!r}", start)
        return self.text[start : self.pos].strip(), start


def _literal(text: str, position: int, scanner: _Scanner) -> Any:
    if not text:
        raise scanner.fail("missing parameter value", position)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if _BARE_WORD.fullmatch(text):
            return text
        raise scanner.fail(f"cannot read parameter value {text!r}", position) from None


def parse_recipe(recipe: str) -> list[Term]:
    """Parse a recipe string into terms; raise `RecipeError` pointing at the first problem."""
    if not isinstance(recipe, str):
        raise TypeError(f"a recipe is a string or a dict, got {type(recipe).__name__}")
    scanner = _Scanner(recipe)
    if not recipe.strip():
        raise scanner.fail("empty recipe", 0)
    terms = []
    while True:
        scanner.skip_space()
        start = scanner.pos
        qualified = scanner.match(_NAME, "a stage or preset name")
        kind, _, name = qualified.rpartition(".")
        params: dict[str, Any] = {}
        if scanner.peek() == "(":
            scanner.pos += 1
            if scanner.peek() != ")":
                while True:
                    key_pos = scanner.pos
                    key = scanner.match(_IDENT, "a parameter name")
                    if key in params:
                        raise scanner.fail(f"parameter {key!r} given twice", key_pos)
                    scanner.expect("=")
                    text, value_pos = scanner.value_text()
                    params[key] = _literal(text, value_pos, scanner)
                    if scanner.peek() == ",":
                        scanner.pos += 1
                        continue
                    break
            scanner.expect(")")
        terms.append(Term(name=name, kind=kind or None, params=params, position=start))
        following = scanner.peek()
        if not following:
            return terms
        if following != "+":
            raise scanner.fail(f"expected '+' or the end, found {following!r}")
        scanner.pos += 1


def format_value(value: Any) -> str:
    """A parameter value as recipe text that `parse_recipe` reads back to an equal value."""
    if isinstance(value, str) and _IDENT.fullmatch(value) and value not in ("True", "False", "None"):
        return value
    if isinstance(value, float) and value.is_integer():
        return repr(value)
    return repr(value)


def format_term(name: str, params: dict[str, Any], kind: Optional[str] = None) -> str:
    """One recipe term: ``kind.name(key=value, ...)`` (parentheses omitted without parameters)."""
    head = f"{kind}.{name}" if kind else name
    if not params:
        return head
    inner = ",".join(f"{key}={format_value(value)}" for key, value in params.items())
    return f"{head}({inner})"
