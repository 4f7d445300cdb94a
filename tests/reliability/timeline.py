"""What each adapter name held, and when, as the admin loop saw it.

An admin call is sent at `sent` and acknowledged at `acked`; the server switches the name
somewhere in between. So a content is *possibly current* from the `sent` of the call that
installed it to the `acked` of the call that replaced or deleted it. A request sent at t0
and finished at t1 may be answered by any content possibly current at some point in
[t0, t1] (the engine pins the version at admission), and may get 404 only if the name was
possibly absent in that window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ABSENT = -1  # content id of "no adapter under this name"


@dataclass
class Span:
    content: int
    start: float            # earliest moment it may be current (the installing call's send time)
    end: float = math.inf   # latest moment it may be current (the replacing call's ack time)


@dataclass
class Timeline:
    spans: dict[str, list[Span]] = field(default_factory=dict)

    def begin(self, name: str, content: int, at: float) -> None:
        """Names start absent at time `at` (or holding `content`, already acknowledged)."""
        self.spans[name] = [Span(content, at)]

    def change(self, name: str, content: int, sent: float, acked: float) -> None:
        """An acknowledged upload / overwrite (content id) or delete (ABSENT)."""
        self.spans[name][-1].end = acked
        self.spans[name].append(Span(content, sent))

    def current(self, name: str) -> int:
        return self.spans[name][-1].content

    def possible(self, name: str, t0: float, t1: float) -> set[int]:
        """Content ids (ABSENT included) the name may have held at some moment in [t0, t1]."""
        return {s.content for s in self.spans[name] if s.start <= t1 and s.end >= t0}
