"""The churn judge's timeline: which contents a request may see while admin calls are in flight."""

from __future__ import annotations

from tests.reliability.timeline import ABSENT, Timeline


def test_a_call_in_flight_makes_old_and_new_content_possible() -> None:
    timeline = Timeline()
    timeline.begin("a", 0, at=0.0)
    timeline.announce("a", ABSENT, sent=1.0)
    # The server may apply the delete before its answer reaches the client.
    assert timeline.possible("a", 1.5, 1.6) == {0, ABSENT}
    assert timeline.current("a") == 0
    timeline.settle("a", acked=2.0)
    assert timeline.current("a") == ABSENT
    assert timeline.possible("a", 0.2, 0.9) == {0}
    assert timeline.possible("a", 1.5, 1.9) == {0, ABSENT}
    assert timeline.possible("a", 2.1, 3.0) == {ABSENT}


def test_a_refused_call_changes_nothing() -> None:
    timeline = Timeline()
    timeline.begin("a", 3, at=0.0)
    timeline.announce("a", 4, sent=1.0)
    timeline.settle("a", acked=None)
    assert timeline.current("a") == 3
    assert timeline.possible("a", 0.5, 5.0) == {3}
