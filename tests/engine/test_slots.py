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


def table_with_budget(budget: int) -> tuple[SlotTable, list[int]]:
    unloaded: list[int] = []
    return SlotTable(8, budget, unload=unloaded.append), unloaded


def test_bytes_not_slots_bound_residency_and_pinned_adapters_stay():
    table, unloaded = table_with_budget(100)
    small = [table.acquire(f"s{i}", lambda s: None, 10) for i in range(4)]  # 40 bytes in 4 slots
    big = table.acquire("big", lambda s: None, 60)
    assert table.used_bytes == 100 and table.free_bytes == 0
    with pytest.raises(NoFreeSlotError):  # every byte is pinned: nothing is evicted
        table.acquire("more", lambda s: None, 10)
    assert unloaded == [] and table.evictions == 0
    table.release(small[0])
    table.acquire("more", lambda s: None, 10)
    assert unloaded == [small[0]] and table.slot_of("s0") is None
    for slot in small[1:] + [big]:
        table.release(slot)
    with pytest.raises(NoFreeSlotError):
        table.acquire("huge", lambda s: None, 101)  # more than the whole pool: refused without evicting
    assert table.evictions == 1


def test_idle_adapters_are_evicted_lru_weighted_by_size():
    table, unloaded = table_with_budget(100)
    big = table.acquire("big", lambda s: None, 60)
    table.release(big)
    for i in range(4):  # four small ones used after the big one, each idle since
        table.release(table.acquire(f"s{i}", lambda s: None, 10))
    # 20 bytes needed: the big adapter (idle 5 uses x 60 bytes) goes, not the two oldest small ones.
    table.acquire("new", lambda s: None, 20)
    assert table.slot_of("big") is None and all(table.slot_of(f"s{i}") is not None for i in range(4))
    assert unloaded == [big] and table.evictions == 1


def test_preload_fills_free_room_only():
    table, unloaded = table_with_budget(30)
    table.acquire("running", lambda s: None, 20)
    assert table.preload("next", lambda s: None, 10) and table.slot_of("next") is not None
    assert not table.preload("later", lambda s: None, 10)  # would need an eviction: not for a read-ahead
    assert unloaded == [] and table.pinned(table.slot_of("next")) == 0
