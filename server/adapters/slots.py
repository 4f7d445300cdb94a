"""Device residency: which adapter sits in which slot, within a slot count and a byte budget (the
adapter pool's), with pins and eviction of idle adapters.

A slot is pinned while a running sequence uses it and is then never evicted. To make room, idle
adapters go first by LRU weighted by size: the victim is the idle adapter with the largest
`(uses since it was last used) x bytes`, so a large adapter idle for a while goes before a small
one idle as long, and a recently used one stays. Nothing is evicted unless the evictions make the
new adapter fit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable


class NoFreeSlotError(RuntimeError):
    """The adapters pinned by running requests leave no slot or too few bytes."""


class SlotTable:
    """Maps adapter keys to slots. `budget`: bytes the resident adapters may take together (None: the
    slot count is the only limit); `unload(slot)`: frees an evicted adapter's slot on the device."""

    def __init__(self, num_slots: int, budget: int | None = None,
                 unload: Callable[[int], None] = lambda slot: None) -> None:
        self.num_slots = num_slots
        self.budget = budget
        self._unload = unload
        self._slot_of: OrderedDict[Hashable, int] = OrderedDict()  # least recently used first
        self._bytes: dict[int, int] = {}      # slot -> bytes its adapter takes
        self._last_use: dict[int, int] = {}   # slot -> tick of its last acquire
        self._pins: dict[int, int] = {}
        self._tick = 0
        self.evictions = 0

    @property
    def used_bytes(self) -> int:
        return sum(list(self._bytes.values()))  # a copy: the metrics read it from another thread

    @property
    def free_bytes(self) -> int | None:
        return None if self.budget is None else self.budget - self.used_bytes

    def slot_of(self, key: Hashable) -> int | None:
        return self._slot_of.get(key)

    def acquire(self, key: Hashable, load: Callable[[int], None], nbytes: int = 0) -> int:
        """Pin the slot holding `key`, loading it (`nbytes` on the device) into a free slot first if
        needed, after evicting idle adapters to make room."""
        slot = self._slot_of.get(key)
        if slot is None:
            slot = self._make_room(nbytes)
            self._place(key, slot, nbytes, load)
        self._touch(key, slot)
        self._pins[slot] = self._pins.get(slot, 0) + 1
        return slot

    def preload(self, key: Hashable, load: Callable[[int], None], nbytes: int) -> bool:
        """Load `key` unpinned if it fits without evicting anything (a read-ahead); True when resident."""
        if key in self._slot_of:
            return True
        slot = self._lowest_free()
        if slot is None or (self.budget is not None and nbytes > self.budget - self.used_bytes):
            return False
        self._place(key, slot, nbytes, load)
        self._slot_of.move_to_end(key, last=False)  # not used yet: first in line if room is needed
        self._last_use[slot] = self._tick
        return True

    def fits(self, nbytes: int) -> bool:
        """Whether an adapter of `nbytes` could be made resident now (evicting idle ones if needed)."""
        idle = [s for s in self._slot_of.values() if not self._pins.get(s)]
        has_slot = len(self._slot_of) < self.num_slots or bool(idle)
        return has_slot and (self.budget is None
                             or self.budget - self.used_bytes + sum(self._bytes[s] for s in idle) >= nbytes)

    def release(self, slot: int) -> None:
        count = self._pins.get(slot, 0) - 1
        if count < 0:
            raise RuntimeError(f"slot {slot} released more often than acquired")
        if count:
            self._pins[slot] = count
        else:
            self._pins.pop(slot, None)

    def forget(self, key: Hashable) -> int | None:
        """Drop `key` from its slot if nothing pins it; returns the freed slot (the caller unloads it)."""
        slot = self._slot_of.get(key)
        if slot is None or self._pins.get(slot):
            return None
        del self._slot_of[key]
        self._bytes.pop(slot, None)
        self._last_use.pop(slot, None)
        return slot

    def keys(self) -> list[Hashable]:
        """Keys resident in a slot, least recently used first."""
        return list(self._slot_of)

    def pinned(self, slot: int) -> int:
        return self._pins.get(slot, 0)

    # Internals --------------------------------------------------------------------------------

    def _place(self, key: Hashable, slot: int, nbytes: int, load: Callable[[int], None]) -> None:
        load(slot)
        self._slot_of[key] = slot
        self._bytes[slot] = nbytes

    def _touch(self, key: Hashable, slot: int) -> None:
        self._tick += 1
        self._slot_of.move_to_end(key)
        self._last_use[slot] = self._tick

    def _lowest_free(self) -> int | None:
        used = set(self._slot_of.values())
        return next((slot for slot in range(self.num_slots) if slot not in used), None)

    def _make_room(self, nbytes: int) -> int:
        """A free slot with `nbytes` free in the budget, evicting idle adapters (LRU weighted by size)."""
        if self.budget is not None and nbytes > self.budget:
            raise NoFreeSlotError(f"the adapter takes {nbytes} bytes, more than the whole pool of {self.budget}")
        if not self.fits(nbytes):
            raise NoFreeSlotError(f"adapters of running requests hold {self.used_bytes} bytes in "
                                  f"{len(self._slot_of)} of {self.num_slots} slots; {nbytes} more are needed")
        while True:
            slot = self._lowest_free()
            if slot is not None and (self.budget is None or self.budget - self.used_bytes >= nbytes):
                return slot
            self._evict(self._victim())

    def _victim(self) -> Hashable:
        def weight(item: tuple[Hashable, int]) -> tuple[int, int]:
            slot = item[1]
            return (self._tick - self._last_use.get(slot, 0) + 1) * max(1, self._bytes.get(slot, 0)), -slot
        idle = [(k, s) for k, s in self._slot_of.items() if not self._pins.get(s)]
        return max(idle, key=weight)[0]

    def _evict(self, key: Hashable) -> None:
        slot = self.forget(key)
        self.evictions += 1
        if slot is not None:  # always: a victim is resident
            self._unload(slot)
