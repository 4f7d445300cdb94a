"""A sequence waiting for a device slot is admitted within a bounded number of steps."""

from __future__ import annotations

from types import SimpleNamespace

from server.engine.kv_cache import BlockAllocator
from server.engine.scheduler import Admission, Scheduler
from server.engine.sequence import Sequence


def seq(name: str, adapter: str) -> Sequence:
    return Sequence(request_id=name, key=name, prompt_len=4, token_ids=[1, 2, 3, 4], params=None, options=None,
                    generator=None, detokenizer=None, stream=None, record=SimpleNamespace(name=adapter))


def test_starving_adapter_gets_a_slot_within_bounded_steps():
    pinned: dict[str, int] = {}

    def admit(s: Sequence) -> Admission:  # one device slot
        adapter = s.record.name
        if pinned and adapter not in pinned:
            return Admission.NO_SLOT
        pinned[adapter] = pinned.get(adapter, 0) + 1
        s.slot = 0
        return Admission.ADMITTED

    def release(s: Sequence) -> None:
        if s.slot is not None:
            pinned[s.record.name] -= 1
            if not pinned[s.record.name]:
                del pinned[s.record.name]
        s.slot = None

    scheduler = Scheduler(allocator=BlockAllocator(256), block_size=16, max_batched_tokens=512, max_running=64, admit=admit,
                          release=release, max_skips=3)
    starving = seq("b", "B")
    scheduler.add(seq("a0", "A"))
    scheduler.add(starving)
    steps_run: dict[str, int] = {}
    for step in range(50):
        scheduler.add(seq(f"a{step + 1}", "A"))  # adapter A keeps getting new requests, so its slot stays pinned
        plan = scheduler.schedule()
        for item in plan:
            item.seq.num_computed += item.num_tokens
            steps_run[item.seq.key] = steps_run.get(item.seq.key, 0) + 1
        if starving in scheduler.running:
            break
        for running in list(scheduler.running):
            if steps_run[running.key] >= 3:
                scheduler.finish(running)  # each A request runs for 3 steps
    assert starving in scheduler.running and step <= 3 + 3  # skipped max_skips times, then the A's drain
