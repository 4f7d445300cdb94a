"""Engine-owned paged KV cache: a fixed pool of blocks and the allocator that hands them out.

A sequence's keys/values live in fixed-size blocks of `block_size` token slots; its
block table (a list of block ids, in token order) maps absolute position `p` to flat
slot `block_table[p // block_size] * block_size + p % block_size`. Blocks of one
sequence need not be contiguous, so memory never fragments and a finished sequence
returns its blocks at once.
"""

from __future__ import annotations

import math
import mmap
from collections import OrderedDict

import torch


class OutOfBlocks(RuntimeError):
    """Not enough free KV blocks for the request; nothing was allocated."""


class BlockAllocator:
    """Fixed pool of block ids `0 .. num_blocks - 1`, each with a reference count.

    `allocate` is all-or-nothing, so a scheduler can try to admit a sequence and back
    off without leaking blocks. `fork` adds a holder to blocks already allocated (the `n`
    choices of one prompt share its prefilled blocks); `free` drops one holder per block
    and returns a block to the pool when its last holder lets go. Freeing a block nobody
    holds is a bug in the caller (it would hand one block to two sequences), so it raises.

    Prefix caching: a full block whose content is known can be `publish`ed under a hash (see
    `prefix_cache.py`). When its last holder frees it, it is kept, still findable by `lookup`, in
    an LRU of cached free blocks; `allocate` takes never-cached free blocks first, then evicts the
    least recently freed cached ones. Cached free blocks count as free.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self._num_total = num_blocks
        # Popped from the end: low ids first, which keeps small tests readable.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refs: dict[int, int] = {}
        self._block_of: dict[bytes, int] = {}           # published hash -> block
        self._hash_of: dict[int, bytes] = {}            # block -> its published hash
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # published, no holder; LRU first
        self.evictions = 0                              # cached blocks reused for other content

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._cached_free)

    @property
    def num_total(self) -> int:
        return self._num_total

    @property
    def num_cached(self) -> int:
        """Blocks findable by hash (held or free)."""
        return len(self._block_of)

    def refcount(self, block: int) -> int:
        return self._refs.get(block, 0)

    def allocate(self, n: int) -> list[int]:
        """`n` block ids, or `OutOfBlocks` with the pool unchanged."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.num_free:
            raise OutOfBlocks(f"need {n} KV blocks, {self.num_free} free of {self._num_total}")
        blocks = [self._free.pop() for _ in range(min(n, len(self._free)))]
        while len(blocks) < n:  # evict the least recently freed cached blocks
            block, _ = self._cached_free.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
            self.evictions += 1
            blocks.append(block)
        for block in blocks:
            self._refs[block] = 1
        return blocks

    def fork(self, blocks: list[int]) -> list[int]:
        """Add one holder to each of `blocks` (all allocated); returns a new list of the same ids."""
        bad = [b for b in blocks if b not in self._refs]
        if bad:
            raise ValueError(f"forking blocks that are not allocated: {bad}")
        for block in blocks:
            self._refs[block] += 1
        return list(blocks)

    def free(self, blocks: list[int]) -> None:
        """Drop one holder of each block; raises `ValueError` (pool unchanged) on a double or foreign free."""
        bad = [b for b in blocks if b not in self._refs]
        if bad or len(set(blocks)) != len(blocks):
            raise ValueError(f"freeing blocks that are not allocated (double free?): {bad or blocks}")
        released = []
        for block in blocks:
            self._refs[block] -= 1
            if not self._refs[block]:
                del self._refs[block]
                if block in self._hash_of:
                    self._cached_free[block] = None
                else:
                    released.append(block)
        self._free.extend(reversed(released))

    def publish(self, block: int, block_hash: bytes) -> bool:
        """Make a held, full block findable under `block_hash`; False (nothing changes) when another
        block already holds that content or this block is published already."""
        if block not in self._refs:
            raise ValueError(f"publishing block {block}, which is not allocated")
        if block_hash in self._block_of or block in self._hash_of:
            return False
        self._block_of[block_hash] = block
        self._hash_of[block] = block_hash
        return True

    def lookup(self, block_hash: bytes) -> int | None:
        """Take one more holder of the block published under `block_hash` (reviving a cached free one)."""
        block = self._block_of.get(block_hash)
        if block is None:
            return None
        if block in self._cached_free:
            del self._cached_free[block]
            self._refs[block] = 1
        else:
            self._refs[block] += 1
        return block


def _text_config(config):
    # Multimodal configs nest the language model's config; plain LMs return themselves.
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of one token's keys and values over every layer of a transformers config."""
    layers, kv_heads, head_dim = KVCache.dims_from_config(config)
    return 2 * layers * kv_heads * head_dim * dtype.itemsize


def _zeros(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor; on the CPU over an anonymous memory map, whose pages the kernel hands out zeroed
    when first touched, so an idle cache costs no memory (`torch.zeros` would write all of it now)."""
    if device.type != "cpu":
        return torch.zeros(shape, device=device, dtype=dtype)
    count = math.prod(shape)
    return torch.frombuffer(mmap.mmap(-1, max(count * dtype.itemsize, 1)), dtype=dtype, count=count).view(shape)


class KVCache:
    """Per-layer key and value pools, allocated once.

    Shapes: `keys[layer]` and `values[layer]` are `[num_kv_heads, num_blocks, block_size,
    head_dim]`, head-major so that a gather of a sequence's blocks lands as `[kv_heads, L, D]`
    matrices attention multiplies as they lie (no transpose copy); `flat_keys(layer)` /
    `flat_values(layer)` view them as `[num_kv_heads, num_blocks * block_size, head_dim]`,
    indexed by flat slot, and `block_rows(layer)` as `[num_kv_heads * num_blocks, block_size *
    head_dim]`, indexed by `head * num_blocks + block`.
    The cache also owns the `BlockAllocator` of its blocks, and the scratch buffers `gather`
    writes into: reused by every layer of every step, so a step's gathers never allocate (a fresh
    tens-of-MB tensor per layer cost more in page faults than the copy itself, measured).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int = 16, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device, self.dtype = torch.device(device), dtype
        shape = (num_kv_heads, num_blocks, block_size, head_dim)
        self.keys = [_zeros(shape, self.device, dtype) for _ in range(num_layers)]
        self.values = [_zeros(shape, self.device, dtype) for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_blocks)
        self._scratch: dict[str, torch.Tensor] = {}

    @staticmethod
    def dims_from_config(config) -> tuple[int, int, int]:
        """(num_layers, num_kv_heads, head_dim) of a transformers config."""
        cfg = _text_config(config)
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cfg.num_hidden_layers, kv_heads, head_dim

    @classmethod
    def from_config(cls, config, num_blocks: int, block_size: int = 16,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> KVCache:
        return cls(*cls.dims_from_config(config), num_blocks=num_blocks, block_size=block_size,
                   device=device, dtype=dtype)

    @classmethod
    def from_memory_budget(cls, config, nbytes: int, block_size: int = 16, device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32) -> KVCache:
        """The largest cache (whole blocks) whose keys and values fit in `nbytes`."""
        per_block = bytes_per_token(config, dtype) * block_size
        if nbytes < per_block:
            raise ValueError(f"a KV cache of {nbytes} bytes cannot hold one block of {block_size} tokens "
                             f"({per_block} bytes)")
        return cls.from_config(config, nbytes // per_block, block_size, device, dtype)

    @classmethod
    def from_token_budget(cls, config, kv_cache_tokens: int, block_size: int = 16,
                          device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> KVCache:
        """A cache holding at least `kv_cache_tokens` tokens (rounded up to whole blocks)."""
        if kv_cache_tokens <= 0:
            raise ValueError(f"kv_cache_tokens must be positive, got {kv_cache_tokens}")
        return cls.from_config(config, math.ceil(kv_cache_tokens / block_size), block_size, device, dtype)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def bytes(self) -> int:
        return sum(t.nbytes for t in self.keys) + sum(t.nbytes for t in self.values)

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's keys and values in every layer (a fork's own copy of a partial block)."""
        for pool in (*self.keys, *self.values):  # [kv_heads, num_blocks, block_size, head_dim]
            pool[:, dst].copy_(pool[:, src])

    def flat_keys(self, layer: int) -> torch.Tensor:
        return self.keys[layer].view(self.num_kv_heads, self.num_slots, self.head_dim)

    def flat_values(self, layer: int) -> torch.Tensor:
        return self.values[layer].view(self.num_kv_heads, self.num_slots, self.head_dim)

    def block_rows(self, pool: torch.Tensor) -> torch.Tensor:
        """A layer's key or value pool as `[num_kv_heads * num_blocks, block_size * head_dim]`."""
        return pool.view(self.num_kv_heads * self.num_blocks, self.block_size * self.head_dim)

    def gather_index(self, blocks: torch.Tensor) -> torch.Tensor:
        """Rows of `block_rows` for block ids `blocks [m]`, every kv head: `[num_kv_heads * m]`."""
        heads = torch.arange(self.num_kv_heads, device=blocks.device) * self.num_blocks
        return (heads[:, None] + blocks[None, :]).reshape(-1)

    def gather(self, pool: torch.Tensor, index: torch.Tensor, n: int, scratch: str) -> torch.Tensor:
        """`n` equal-length block lists (`index` from `gather_index`) -> `[kv_heads, n, L, head_dim]`,
        one `index_select` of whole blocks (contiguous chunks, far cheaper than single slots).

        The result is a view of the scratch buffer named `scratch`: valid until the next gather
        into the same name (the attention of one layer uses "keys" and "values", then the next
        layer overwrites them).
        """
        rows = self.block_rows(pool)
        out = self._scratch_rows(scratch, index.numel(), rows)
        torch.index_select(rows, 0, index, out=out)
        return out.view(self.num_kv_heads, n, -1, self.head_dim)

    def _scratch_rows(self, name: str, count: int, like: torch.Tensor) -> torch.Tensor:
        """The first `count` rows of scratch buffer `name` (grown, never shrunk, as steps need)."""
        buf = self._scratch.get(name)
        if buf is None or buf.shape[0] < count:
            buf = torch.empty(max(count, self.num_kv_heads * 64), like.shape[1], device=like.device, dtype=like.dtype)
            self._scratch[name] = buf
        return buf[:count]
