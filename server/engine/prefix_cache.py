"""Prefix caching: KV blocks of a prompt prefix reused across requests, keyed by content.

A full block's key is a hash chain over token ids: `h_i = sha256(h_{i-1} || ids of block i)`,
seeded with the identity of the weights that computed it: the adapter version's sha256 (the
exact stored config and weights bytes; a composition's content hash), or a seed of its own for
the base model. Never by name or slot: a hit can only come from the very same weights and the
very same tokens, so another adapter, or an older version under the same name, never shares a
block, while an overwrite with identical bytes may.

Only full, computed blocks are published, and at least the last token of a sequence is always
computed again (its logits pick the next token). The allocator (`kv_cache.BlockAllocator`)
reference-counts blocks and keeps free published ones in an LRU it evicts from when the never
cached free blocks run out.
"""

from __future__ import annotations

import hashlib
from array import array

from server.engine.kv_cache import BlockAllocator
from server.engine.sequence import Sequence

_BASE_SEED = hashlib.sha256(b"loraplex-prefix-v1\0base").digest()


def identity_seed(sha256: str | None) -> bytes:
    """The chain's seed for weights of content hash `sha256` (None: the base model)."""
    if sha256 is None:
        return _BASE_SEED
    return hashlib.sha256(b"loraplex-prefix-v1\0adapter\0" + sha256.encode()).digest()


class PrefixCache:
    """Finds and publishes a sequence's cached blocks; the engine thread's only (no locking)."""

    def __init__(self, allocator: BlockAllocator, block_size: int, enabled: bool = True) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.enabled = enabled
        self.queried_tokens = 0   # tokens of sequences admitted while enabled
        self.hit_tokens = 0       # of those, tokens whose KV came from the cache

    def match(self, seq: Sequence) -> list[int]:
        """Take a holder of each cached block of the sequence's longest cached prefix (full blocks only,
        never its last token); the caller owns them (frees them if the admission backs off)."""
        if not self.enabled:
            return []
        usable = (len(seq.token_ids) - 1) // self.block_size
        hashes = self._hashes(seq, usable)
        blocks: list[int] = []
        for block_hash in hashes[:usable]:
            block = self.allocator.lookup(block_hash)
            if block is None:
                break
            blocks.append(block)
        seq.num_published = len(blocks)
        self.queried_tokens += len(seq.token_ids)
        self.hit_tokens += len(blocks) * self.block_size
        return blocks

    def publish(self, seq: Sequence) -> None:
        """Publish the sequence's blocks that became full and computed (after a step)."""
        if not self.enabled:
            return
        full = min(seq.num_computed // self.block_size, len(seq.blocks))
        if full <= seq.num_published:
            return
        hashes = self._hashes(seq, full)
        for i in range(seq.num_published, full):
            self.allocator.publish(seq.blocks[i], hashes[i])
        seq.num_published = full

    @property
    def hit_ratio(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def _hashes(self, seq: Sequence, count: int) -> list[bytes]:
        """The chain of the sequence's first `count` full blocks (extended as it grows; reset if its
        weights' identity changed, which only happens before its first admission)."""
        seed = identity_seed(None if seq.record is None else seq.record.sha256)
        if seq.hash_seed != seed:
            seq.hash_seed, seq.block_hashes = seed, []
        chain = seq.block_hashes
        size = self.block_size
        for i in range(len(chain), count):
            previous = chain[i - 1] if i else seed
            ids = array("q", seq.token_ids[i * size:(i + 1) * size]).tobytes()
            chain.append(hashlib.sha256(previous + ids).digest())
        return chain
