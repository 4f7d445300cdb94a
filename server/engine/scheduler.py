"""Picks the sequences of each step: decodes first, then prefill chunks, within budgets.

Budgets per step: `max_batched_tokens` tokens, `max_running` sequences, the KV blocks that
are free, and the device's adapter memory: a sequence is admitted when its adapter is resident or
fits in the adapter pool once idle adapters are evicted (`admit`; its slot is pinned while it runs),
so how many distinct adapters share a step depends on their bytes, not a slot count.
When a running sequence needs a block and none is free, the newest running sequence is
preempted: its blocks and slot pin are released and it is recomputed later.

Progress is guaranteed: the front refuses any sequence larger than the whole KV cache, and
a sequence refused room for its adapter `max_skips` times stops the admission of every other
sequence that would pin an adapter, until running ones drain and it gets its room (aging).

The scheduler is the only writer of a sequence's scheduling state: its status, the queue it is in,
its KV blocks, `num_computed` (after each step: `computed`), its choices' fork (`fork`) and its end
(`finish`). The adapter manager's `admit` / `release`, called from here, bind and pin its adapter.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from server.engine.kv_cache import BlockAllocator, OutOfBlocks
from server.engine.prefix_cache import PrefixCache
from server.engine.sequence import SeqStatus, Sequence

log = logging.getLogger(__name__)


class Admission(enum.Enum):
    ADMITTED = "admitted"
    LOADING = "loading"      # its adapter's weights are still being read from disk
    NO_SLOT = "no_slot"      # adapters pinned by running sequences leave too little pool (or no slot)


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int          # tokens fed this step
    samples: bool            # this step feeds all pending tokens, so the next token is sampled

    @classmethod
    def of(cls, seq: Sequence, num_tokens: int) -> ScheduledSeq:
        return cls(seq, num_tokens, num_tokens == seq.num_pending)


class Scheduler:
    def __init__(self, *, allocator: BlockAllocator, block_size: int, max_batched_tokens: int, max_running: int,
                 admit: Callable[[Sequence], Admission], release: Callable[[Sequence], None],
                 copy_block: Callable[[int, int], None] | None = None, max_skips: int = 8,
                 prefix_cache: PrefixCache | None = None) -> None:
        """`admit(seq)` pins the sequence's adapter slot; `release(seq)` unpins it; `copy_block(src, dst)`
        copies one KV block (a fork's partial block). An admitted sequence starts from the longest prefix
        `prefix_cache` holds (None: no prefix caching)."""
        self.max_skips = max_skips
        self.prefix_cache = prefix_cache or PrefixCache(allocator, block_size, enabled=False)
        self.allocator = allocator
        self.block_size = block_size
        self.max_batched_tokens = max_batched_tokens
        self.max_running = max_running
        self._admit = admit
        self._release = release
        self._copy_block = copy_block
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0  # sequences sent back to recompute for want of KV blocks

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_front(self, seq: Sequence) -> None:
        """A sequence that was already due (a choice whose fork could not happen)."""
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_batched_tokens
        plan: list[ScheduledSeq] = []
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING or budget <= 0:
                continue
            n = min(seq.num_pending, budget)
            if not self._reserve(seq, n, plan):
                continue
            plan.append(ScheduledSeq.of(seq, n))
            budget -= n
        self._admit_waiting(plan, budget)
        return plan

    def computed(self, plan: list[ScheduledSeq]) -> None:
        """After a step: its tokens are in the KV cache, and the blocks it filled become findable by the
        prefix cache."""
        for item in plan:
            item.seq.num_computed += item.num_tokens
            self.prefix_cache.publish(item.seq)

    def fork(self, parent: Sequence) -> list[Sequence]:
        """Start the parent's other choices once its prefill ended, on its prompt's KV: shared full blocks, an
        own copy of the partial one. A choice that cannot fork now prefills on its own later."""
        children = [c for c in parent.children if c.status is not SeqStatus.FINISHED]  # not aborted meanwhile
        parent.children = []
        full, partial = divmod(parent.prompt_len, self.block_size)
        forked: list[Sequence] = []
        for child in children:
            child.record, child.adapter = parent.record, parent.adapter
            child.prompt_logprobs = parent.prompt_logprobs
            if self._admit(child) is not Admission.ADMITTED:  # cannot happen: the parent pins the slot
                self.add_front(child)
                continue
            shared = self.allocator.fork(parent.blocks[:full])
            try:
                own = self.allocator.allocate(1) if partial else []
            except OutOfBlocks:  # no room to fork: this choice prefills on its own later
                self.allocator.free(shared)
                self._release(child)
                self.add_front(child)
                continue
            if own:
                assert self._copy_block is not None, "a fork of a partial block needs copy_block"
                self._copy_block(parent.blocks[full], own[0])
            child.blocks, child.num_computed = shared + own, parent.prompt_len
            child.status = SeqStatus.RUNNING
            self.running.append(child)
            forked.append(child)
        return forked

    def finish(self, seq: Sequence) -> bool:
        """Free everything a sequence holds (finished, aborted or failed); its choices still waiting to fork
        start on their own. False when it had finished already."""
        if seq.status is SeqStatus.FINISHED:
            return False
        alive = [c for c in seq.children if c.status is not SeqStatus.FINISHED]
        seq.children = []
        if alive:
            alive[0].children = alive[1:]
            self.add_front(alive[0])
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)
        seq.status = SeqStatus.FINISHED
        return True

    # Internals --------------------------------------------------------------------------------

    def _admit_waiting(self, plan: list[ScheduledSeq], budget: int) -> None:
        skipped: list[Sequence] = []
        starving = False  # an older sequence waits too long for a slot: admit none that would pin one
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting.popleft()
            if self.running and len(self.running) + seq.group_size > self.max_running:
                skipped.append(seq)
                continue
            if starving and seq.record is not None:
                skipped.append(seq)
                continue
            admission = self._admit(seq)
            if admission is not Admission.ADMITTED:
                skipped.append(seq)  # its adapter is loading or every slot is pinned: let others go first
                if admission is Admission.NO_SLOT:
                    seq.skips += 1
                    starving = starving or seq.skips >= self.max_skips
                continue
            # Its KV is there already: prefill starts after it. Not for prompt logprobs: a cached prefix
            # has no logits, so such a sequence computes its whole prompt (and still publishes its blocks).
            cached = self.prefix_cache.match(seq) if seq.prompt_logprobs is None else []
            seq.num_computed = len(cached) * self.block_size
            n = min(seq.num_pending, budget)
            try:
                seq.blocks = cached + self.allocator.allocate(self._blocks_needed(seq, n) - len(cached))
            except OutOfBlocks:
                self.allocator.free(cached)
                seq.num_computed = seq.num_published = 0
                self._release(seq)
                self.waiting.appendleft(seq)
                break
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            plan.append(ScheduledSeq.of(seq, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def _reserve(self, seq: Sequence, n: int, plan: list[ScheduledSeq]) -> bool:
        """Make sure `seq` has blocks for `n` more tokens, preempting newer sequences if needed."""
        while True:
            missing = self._blocks_needed(seq, n) - len(seq.blocks)
            if missing <= 0:
                return True
            try:
                seq.blocks.extend(self.allocator.allocate(missing))
                return True
            except OutOfBlocks:
                victim = self._newest_unplanned(plan)
                if victim is None:
                    return False
                self._preempt(victim)
                if victim is seq:
                    return False

    def _newest_unplanned(self, plan: list[ScheduledSeq]) -> Sequence | None:
        planned = {id(p.seq) for p in plan}
        for seq in reversed(self.running):
            if id(seq) not in planned:
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        self.preemptions += 1
        if math.log10(self.preemptions).is_integer():  # the 1st, 10th, 100th...: a hint, not a flood
            log.warning("%d sequences preempted (recomputed) so far for want of KV cache blocks; a larger "
                        "--kv-cache-gb, or a smaller --max-running, avoids the recomputation", self.preemptions)
        self.running.remove(seq)
        self._free(seq)
        seq.num_computed = seq.num_published = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def _free(self, seq: Sequence) -> None:
        if seq.blocks:
            self.allocator.free(seq.blocks)
            seq.blocks = []
        if seq.slot is not None:
            self._release(seq)

    def _blocks_needed(self, seq: Sequence, n: int) -> int:
        return -(-(seq.num_computed + n) // self.block_size)
