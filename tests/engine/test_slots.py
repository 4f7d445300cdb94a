"""Device slot table: LRU eviction that never evicts a pinned slot."""

from __future__ import annotations

import pytest

from server.adapters.slots import NoFreeSlotError, SlotTable


def test_lru_eviction_skips_pinned_slots():
    table = SlotTable(2)
    loads: list[tuple[str, int]] = []
    a = table.acquire("a", lambda s: loads.append(("a", s)))
    b = table.acquire("b", lambda s: loads.append(("b", s)))
    table.release(b)
    c = table.acquire("c", lambda s: loads.append(("c", s)))  # a is pinned, so b is evicted
    assert c == b and table.slot_of("b") is None and table.slot_of("a") == a
    with pytest.raises(NoFreeSlotError):
        table.acquire("d", lambda s: None)
    table.release(a)
    again = table.acquire("a", lambda s: loads.append(("a-again", s)))
    assert again == a and loads == [("a", 0), ("b", 1), ("c", 1)]  # resident: no reload


def test_forget_only_unpinned_and_release_balance():
    table = SlotTable(1)
    slot = table.acquire("a", lambda s: None)
    assert table.forget("a") is None  # in use
    table.release(slot)
    assert table.forget("a") == slot and table.slot_of("a") is None
    with pytest.raises(RuntimeError):
        table.release(slot)
