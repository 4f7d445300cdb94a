"""Regular expressions from untrusted adapter configs, compiled and run with bounded cost.

PEFT matches module names with Python's `re`; a hostile pattern could make `re` backtrack
for hours (no timeout) or make compiling unroll a huge counted repetition. So a pattern
must parse as `re` syntax (what PEFT accepts), its unrolled size is bounded before
compiling, and matching uses the `regex` module (a transformers dependency; its default
VERSION0 behaves like `re`) with a timeout taken from one shared deadline.
"""

from __future__ import annotations

import re
import time
from typing import Any

import regex

try:  # the `re` parser: re._parser from Python 3.11, sre_parse before
    from re import _parser as _re_parser  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import sre_parse as _re_parser

MAX_PATTERN_CHARS = 2000
MAX_UNROLLED_SIZE = 20_000  # legitimate module-name patterns are far below this
_REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}


class PatternError(ValueError):
    """A pattern that is invalid, too costly, or too slow; the message says which."""


class BoundedRegex:
    """Compiles and runs config-supplied patterns under one shared deadline."""

    def __init__(self, budget_s: float) -> None:
        self._deadline = time.monotonic() + budget_s
        self._compiled: dict[str, regex.Pattern] = {}

    def match(self, pattern: str, text: str, field: str, full: bool = False) -> regex.Match | None:
        """`re.match` (or `re.fullmatch`) semantics; `field` names the config key in errors."""
        compiled = self._compile(pattern, field)
        left = self._deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            return compiled.fullmatch(text, timeout=left) if full else compiled.match(text, timeout=left)
        except TimeoutError:
            raise PatternError(
                f"matching the {field} patterns against the base model's modules took too long; simplify them"
            ) from None

    def _compile(self, pattern: str, field: str) -> regex.Pattern:
        if pattern not in self._compiled:
            if len(pattern) > MAX_PATTERN_CHARS:
                raise PatternError(f"a {field} pattern is longer than {MAX_PATTERN_CHARS} characters")
            try:
                size = _unrolled_size(_re_parser.parse(pattern))
                self._compiled[pattern] = None if size > MAX_UNROLLED_SIZE else regex.compile(pattern)
            except (re.error, regex.error, ValueError, OverflowError, RecursionError, MemoryError) as exc:
                raise PatternError(f"invalid regular expression in {field}: {str(exc)[:200]}") from None
            if self._compiled[pattern] is None:
                raise PatternError(f"a {field} pattern repeats too much (unrolled size {size})")
        return self._compiled[pattern]


def _unrolled_size(node: Any) -> int:
    """Size of a parsed `re` pattern with counted repeats unrolled: nested counts multiply."""
    if isinstance(node, list | _re_parser.SubPattern):
        return sum(_unrolled_size(item) for item in node)
    op, arg = node
    if str(op) in _REPEATS:
        low, high, body = arg
        count = max(1, low, 0 if high == _re_parser.MAXREPEAT else high)
        return count * _unrolled_size(body)
    return 1 + sum(_unrolled_size(child) for child in _subpatterns(arg))


def _subpatterns(arg: Any) -> list[Any]:
    """The sub-patterns nested anywhere in an opcode's argument (groups, branches, lookarounds)."""
    if isinstance(arg, _re_parser.SubPattern):
        return [arg]
    if isinstance(arg, tuple | list):
        return [sub for item in arg for sub in _subpatterns(item)]
    return []
