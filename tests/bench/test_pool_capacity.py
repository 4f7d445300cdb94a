"""On the default model, the adapter pool holds at least twice as many adapters of the benchmark's mix
(ranks 4-64, mixed targets) as padded rank-16 slots of the same bytes, and far more than padded slots
wide enough (rank 64) to take every adapter of the mix."""

from __future__ import annotations

import pytest

from bench.scaling import RANK_CYCLE, adapter_kinds, pool_capacity
from server.adapters.layout import BaseLayout
from server.lora.model import padded_slot_bytes


@pytest.mark.slow
@pytest.mark.parametrize("slots", [8, 32])
def test_pool_holds_twice_the_padded_slots_of_its_bytes(default_base, slots):
    import torch

    layout = BaseLayout.from_model(default_base.model)
    pool_bytes = slots * padded_slot_bytes(layout, 16, torch.float32)
    capacity = pool_capacity(layout, pool_bytes, adapter_kinds(1000, RANK_CYCLE))
    assert capacity["padded_slots_rank16"] == pytest.approx(slots, rel=0.01)
    assert capacity["pool_holds"] >= 2 * capacity["padded_slots_rank16"]
    assert capacity["pool_holds"] >= 8 * capacity["padded_slots_rank64"]
