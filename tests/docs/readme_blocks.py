"""The runnable code blocks of README.md and docs/*.md, and the markers that exempt some of them.

A fenced block tagged `bash`, `sh`, `shell` or `python` is runnable. A block runs in the doc test
unless the line before it (blank lines aside) is a marker:

    <!-- doctest: skip (why it cannot run in a test) -->   never run; listed with its reason
    <!-- doctest: full (why it is long) -->                 run only by the full doc test

Any other fenced block (output samples, plain text) is not code and is never run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

RUNNABLE = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python"}
FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*doctest:\s*(skip|full)\s*\((.+)\)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    language: str  # "bash" or "python"
    code: str
    mode: str  # "run", "full" or "skip"
    reason: str = ""
    source: str = "README.md"  # the file, relative to the checkout

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def id(self) -> str:
        first = next((s.strip() for s in self.code.splitlines() if s.strip() and not s.startswith("#")), "")
        stem = Path(self.source).stem
        return f"{stem}-L{self.line}-{self.language}-{re.sub(r'[^A-Za-z0-9]+', '-', first)[:40].strip('-')}"


class MarkerError(ValueError):
    """A doctest marker that is malformed or marks nothing runnable."""


def readme_blocks(path: Path, source: str | None = None) -> list[Block]:
    """The runnable blocks of the Markdown file `path`, each marked with `source` (default: its file name)."""
    source = source or path.name
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    pending: tuple[int, str, str] | None = None  # (line, mode, reason) of a marker waiting for its block
    i = 0
    while i < len(lines):
        text = lines[i]
        if text.lstrip().startswith("<!--") and "doctest" in text:
            match = MARKER.match(text.strip())
            if not match:
                raise MarkerError(f"{source}:{i + 1}: malformed marker {text.strip()!r}; "
                                  "write <!-- doctest: skip (reason) --> or <!-- doctest: full (reason) -->")
            pending = (i + 1, match.group(1), match.group(2).strip())
            i += 1
            continue
        fence = FENCE.match(text)
        if not fence:
            if text.strip() and pending is not None:
                raise MarkerError(f"{source}:{pending[0]}: the marker is not followed by a code block")
            i += 1
            continue
        start, language = i + 1, fence.group(1).lower()
        i += 1
        body: list[str] = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        if language in RUNNABLE:
            mode, reason = ("run", "") if pending is None else pending[1:]
            blocks.append(Block(start, RUNNABLE[language], "\n".join(body) + "\n", mode, reason, source))
        elif pending is not None:
            raise MarkerError(f"{source}:{pending[0]}: the marker precedes a {language or 'plain'} block, "
                              "which is never run anyway")
        pending = None
    return blocks
