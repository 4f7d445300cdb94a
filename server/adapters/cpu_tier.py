"""The CPU tier: parsed adapters in memory, an LRU bounded by count and by bytes.

It knows identities (an `AdapterKey`, or a derived key such as a composition's) and bytes, never
names: which version is current is the registry's business. A derived entry names the keys it was
built from and leaves the tier with the first of them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable

from server.adapters.locks import TIER, ordered_lock
from server.adapters.peft_format import ParsedAdapter


class CpuTier:
    """Thread-safe: the engine thread reads, the registry and its loader insert and drop."""

    def __init__(self, *, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, ParsedAdapter] = OrderedDict()
        self._derived: dict[Hashable, frozenset[Hashable]] = {}  # derived key -> the keys it was built from
        self._bytes = 0  # sum of size_bytes over the entries
        self._lock = ordered_lock(TIER)

    def get(self, key: Hashable) -> ParsedAdapter | None:
        """The adapter under `key` (now the most recently used), or None."""
        with self._lock:
            adapter = self._entries.get(key)
            if adapter is not None:
                self._entries.move_to_end(key)
            return adapter

    def holds(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def keys(self) -> list[Hashable]:
        """Least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def bytes(self) -> int:
        """Bytes of parsed adapters held now."""
        with self._lock:
            return self._bytes

    def put(self, key: Hashable, adapter: ParsedAdapter, parts: Iterable[Hashable] | None = None) -> None:
        """Insert (a derived adapter: with the keys it was built from), then evict least recently used entries
        while the tier holds more than `max_count` adapters or `max_bytes` bytes; the one inserted stays."""
        with self._lock:
            self._drop(key)
            self._entries[key] = adapter
            self._bytes += adapter.size_bytes
            if parts is not None:
                self._derived[key] = frozenset(parts)
            while len(self._entries) > 1 and (len(self._entries) > self.max_count or self._bytes > self.max_bytes):
                evicted_key, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.size_bytes
                self._derived.pop(evicted_key, None)

    def drop(self, key: Hashable) -> None:
        """Drop `key`, with every derived adapter built from it."""
        with self._lock:
            self._drop(key)
            for derived in [d for d, parts in self._derived.items() if key in parts]:
                self._drop(derived)

    def _drop(self, key: Hashable) -> None:
        self._derived.pop(key, None)
        adapter = self._entries.pop(key, None)
        if adapter is not None:
            self._bytes -= adapter.size_bytes
