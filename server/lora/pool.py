"""One device's adapter memory: a flat tensor sized in bytes, where each resident adapter holds one
extent of whole pages with exactly its own weights (its real rank, only the modules it targets).

A slot is only a name for a resident adapter (an index into small per-slot tables); what limits how
many adapters are resident is the pool's bytes, not a count of max-rank slots. Inside an adapter's
extent every weight is a block `[rank, row]` (rank rows of `row` elements each) at a fixed element
offset (`PooledWeight.rel`), so the op finds member g of slot s at `base[s] + rel[g, s]`: moving an
extent (compaction) changes `base[s]` only.

Extents are placed first-fit; when the free pages suffice but no hole does, the extents are slid
down to the start (between steps, on the engine thread that also runs the op), so an allocation
that fits by bytes never fails. On the CPU the tensor is allocated uncommitted, in 2 MiB pages
(server/huge_pages.py): pages are committed as adapters are first written into them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.huge_pages import empty_in_huge_pages

PAGE_BYTES = 64 * 1024  # the allocation unit: small beside an adapter (a rank-4 q/v adapter of the default model: 1.7 MB)


class PoolFull(RuntimeError):
    """The free pages cannot hold the adapter (the caller evicts idle adapters first)."""


class AdapterPool:
    def __init__(self, nbytes: int, slots: int, device: torch.device | str, dtype: torch.dtype,
                 page_bytes: int = PAGE_BYTES) -> None:
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.page = max(1, page_bytes // itemsize)  # elements per page
        self.page_bytes = self.page * itemsize
        self.num_pages = max(1, nbytes // self.page_bytes)
        # Each decode step streams every in-flight adapter's weights: on the CPU from 2 MiB pages
        self.data = empty_in_huge_pages(self.num_pages * self.page, dtype, device)
        self.base = torch.zeros(slots, dtype=torch.int64, device=device)  # element offset of each slot's extent
        self.base_host = [0] * slots
        self.extents: dict[int, tuple[int, int]] = {}  # slot -> (first page, pages)
        self.compactions = 0

    # Sizes ----------------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return self.num_pages * self.page_bytes

    def pages_for(self, elements: int) -> int:
        return max(1, -(-elements // self.page))

    def bytes_for(self, elements: int) -> int:
        """What an adapter of `elements` weights takes in the pool (whole pages)."""
        return self.pages_for(elements) * self.page_bytes

    @property
    def used_pages(self) -> int:
        # A copy first: the metrics read this from another thread while the engine thread allocates.
        return sum(pages for _, pages in list(self.extents.values()))

    @property
    def free_pages(self) -> int:
        return self.num_pages - self.used_pages

    # Extents --------------------------------------------------------------------------------------

    def allocate(self, slot: int, elements: int) -> int:
        """An extent for `slot` of at least `elements`; returns its element offset (also `base[slot]`)."""
        if slot in self.extents:
            raise RuntimeError(f"slot {slot} already holds an extent")
        pages = self.pages_for(elements)
        if pages > self.free_pages:
            raise PoolFull(f"{pages} pages needed, {self.free_pages} free of {self.num_pages}")
        start = self._hole(pages)
        if start is None:
            self._compact()
            start = self._hole(pages)
        if start is None:  # cannot be: compaction leaves every free page in one run at the end
            raise RuntimeError(f"no run of {pages} free pages after compaction")
        self.extents[slot] = (start, pages)
        self._set_base(slot, start * self.page)
        return start * self.page

    def free(self, slot: int) -> None:
        self.extents.pop(slot, None)

    def view(self, offset: int, rows: int, row: int) -> torch.Tensor:
        """The block `[rows, row]` at element `offset` (a view of the pool)."""
        return self.data[offset:offset + rows * row].view(rows, row)

    def _hole(self, pages: int) -> int | None:
        """First page of the lowest hole of `pages` free pages (first fit)."""
        cursor = 0
        for start, length in sorted(self.extents.values()):
            if start - cursor >= pages:
                return cursor
            cursor = start + length
        return cursor if self.num_pages - cursor >= pages else None

    @torch.no_grad()
    def _compact(self) -> None:
        """Slide every extent down to the lowest free page, in address order (so a move never overwrites
        an extent not yet moved)."""
        cursor = 0
        for slot, (start, pages) in sorted(self.extents.items(), key=lambda item: item[1][0]):
            if start != cursor:
                src = self.data[start * self.page:(start + pages) * self.page]
                dst = self.data[cursor * self.page:(cursor + pages) * self.page]
                dst.copy_(src.clone() if start - cursor < pages else src)  # overlapping ranges go through a copy
                self.extents[slot] = (cursor, pages)
                self._set_base(slot, cursor * self.page)
            cursor += pages
        self.compactions += 1

    def _set_base(self, slot: int, offset: int) -> None:
        set_item(self.base, slot, offset)
        self.base_host[slot] = offset


def set_item(table: torch.Tensor, index: int | tuple[int, int], value: int) -> None:
    """`table[index] = value` for a small table: through NumPy on the CPU, where a torch element write costs
    some 10 us of dispatch (an adapter write sets hundreds of them), as a torch op elsewhere."""
    if table.device.type == "cpu":
        table.numpy()[index] = value
    else:
        table[index] = value


@dataclass(eq=False)
class PooledWeight:
    """One (possibly stacked) weight of every slot, inside the pool: member g of slot s is the block
    `[rank, row]` at element `pool.base[s] + rel[g, s]` (A: `row` = in features; B: kept rank-major,
    `row` = out features). `width` is the rank every member is padded to in the op's activations
    (the server's max rank); the weights themselves are never padded."""

    pool: AdapterPool
    members: int
    row: int
    width: int
    rel: torch.Tensor = field(init=False)
    rel_host: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        slots = self.pool.base.numel()
        self.rel = torch.zeros(self.members, slots, dtype=torch.int64, device=self.pool.base.device)
        self.rel_host = [[0] * slots for _ in range(self.members)]

    @property
    def dtype(self) -> torch.dtype:
        return self.pool.data.dtype

    def place(self, member: int, slot: int, rel: int) -> None:
        set_item(self.rel, (member, slot), rel)
        self.rel_host[member][slot] = rel

    def block(self, member: int, slot: int, rank: int) -> torch.Tensor:
        """`[rank, row]` view of member `member` of `slot` (its first `rank` rows)."""
        return self.pool.view(self.pool.base_host[slot] + self.rel_host[member][slot], rank, self.row)
