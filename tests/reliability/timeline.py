"""What each adapter name held, and when, as the admin loop saw it.

An admin call is sent at `sent` and acknowledged at `acked`; the server switches the name
somewhere in between. So a content is *possibly current* from the `sent` of the call that
installed it to the `acked` of the call that replaced or deleted it. A call is announced
before it is sent: a request judged while the call is still in flight (the server may
already have applied it) must count both the old and the new content as possible. A request sent at t0
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
    pending: bool = False   # its installing call is sent but not yet acknowledged


@dataclass
class Timeline:
    spans: dict[str, list[Span]] = field(default_factory=dict)

    def begin(self, name: str, content: int, at: float) -> None:
        """Names start absent at time `at` (or holding `content`, already acknowledged)."""
        self.spans[name] = [Span(content, at)]

    def announce(self, name: str, content: int, sent: float) -> None:
        """An upload / overwrite (content id) or delete (ABSENT) is about to be sent."""
        assert not self.spans[name][-1].pending, f"{name}: one admin call at a time"
        self.spans[name].append(Span(content, sent, pending=True))

    def settle(self, name: str, acked: float | None) -> None:
        """The announced call was acknowledged at `acked`, or refused (None: nothing changed)."""
        spans = self.spans[name]
        if acked is None:
            spans.pop()
            return
        spans[-1].pending = False
        spans[-2].end = acked

    def current(self, name: str) -> int:
        """The content of the last acknowledged call."""
        return next(s.content for s in reversed(self.spans[name]) if not s.pending)

    def possible(self, name: str, t0: float, t1: float) -> set[int]:
        """Content ids (ABSENT included) the name may have held at some moment in [t0, t1]."""
        return {s.content for s in self.spans[name] if s.start <= t1 and s.end >= t0}
