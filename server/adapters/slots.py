"""Device slots: which adapter sits in which of the `max_loras` slots, with LRU eviction and pins."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable


class NoFreeSlotError(RuntimeError):
    """Every slot is pinned by a running request."""


class SlotTable:
    """Maps adapter keys to slots. A pinned slot (in use by a running sequence) is never evicted."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._slot_of: OrderedDict[Hashable, int] = OrderedDict()  # least recently used first
        self._pins: dict[int, int] = {}

    def slot_of(self, key: Hashable) -> int | None:
        return self._slot_of.get(key)

    def acquire(self, key: Hashable, load: Callable[[int], None]) -> int:
        """Pin the slot holding `key`, loading it into a free or evicted slot first if needed."""
        slot = self._slot_of.get(key)
        if slot is None:
            slot = self._free_slot()
            load(slot)
            self._slot_of[key] = slot
        self._slot_of.move_to_end(key)
        self._pins[slot] = self._pins.get(slot, 0) + 1
        return slot

    def release(self, slot: int) -> None:
        count = self._pins.get(slot, 0) - 1
        if count < 0:
            raise RuntimeError(f"slot {slot} released more often than acquired")
        if count:
            self._pins[slot] = count
        else:
            self._pins.pop(slot, None)

    def forget(self, key: Hashable) -> int | None:
        """Drop `key` from its slot if nothing pins it; returns the freed slot."""
        slot = self._slot_of.get(key)
        if slot is None or self._pins.get(slot):
            return None
        del self._slot_of[key]
        return slot

    def keys(self) -> list[Hashable]:
        """Keys resident in a slot, least recently used first."""
        return list(self._slot_of)

    def pinned(self, slot: int) -> int:
        return self._pins.get(slot, 0)

    def _free_slot(self) -> int:
        used = set(self._slot_of.values())
        for slot in range(self.num_slots):
            if slot not in used:
                return slot
        for key, slot in self._slot_of.items():  # least recently used first
            if not self._pins.get(slot):
                del self._slot_of[key]
                return slot
        raise NoFreeSlotError(f"all {self.num_slots} adapter slots are in use")
