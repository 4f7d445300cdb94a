"""The adapter pool: extents placed first-fit and compacted without losing data, each adapter stored
at its own rank and targets, the compiled kernels reading it, and mixed batches equal to PEFT after
evictions and compactions moved adapters around."""

from __future__ import annotations

import copy

import pytest
import torch

from server.adapters.layout import BaseLayout
from server.adapters.peft_format import load_peft_adapter
from server.lora import cpu_native
from server.lora.model import LoraModel, padded_slot_bytes
from server.lora.ops import CPU_KERNELS, REFERENCE
from server.lora.pool import AdapterPool, PooledWeight, PoolFull
from server.lora.ranks import WeightRanks
from server.lora.step import LoraStepMeta
from server.native.loader import load_kernels
from tests.conftest import tiny_llama
from tests.lora.padded_batch import forward_logits, generate_batch
from tests.lora.peft_fixtures import make_peft_adapters
from tests.lora.test_peft_equivalence import assert_rows_match_oracle, mixed_rows, peft_oracle

MAX_RANK = 64


def filled(pool: AdapterPool, slot: int, elements: int) -> torch.Tensor:
    offset = pool.allocate(slot, elements)
    values = torch.arange(elements, dtype=pool.data.dtype) + 1000 * slot
    pool.data[offset:offset + elements] = values
    return values


def test_extents_first_fit_then_compaction_keeps_every_adapter_s_data():
    pool = AdapterPool(8 * 64, slots=8, device="cpu", dtype=torch.float32, page_bytes=64)  # 8 pages of 16
    kept = {0: filled(pool, 0, 20), 1: filled(pool, 1, 16), 2: filled(pool, 2, 30)}  # pages 0-1, 2, 3-4
    pool.free(1)
    kept.pop(1)
    kept[3] = filled(pool, 3, 10)  # first fit: the hole at page 2
    assert pool.extents[3] == (2, 1) and pool.compactions == 0
    pool.free(0)
    kept.pop(0)
    assert pool.free_pages == 5
    kept[4] = filled(pool, 4, 70)  # 5 pages: free only as a whole once the extents slide down
    assert pool.compactions == 1 and pool.free_pages == 0
    for slot, values in kept.items():
        offset = pool.base_host[slot]
        assert int(pool.base[slot]) == offset
        assert torch.equal(pool.data[offset:offset + len(values)], values)
    with pytest.raises(PoolFull):
        pool.allocate(5, 1)


def adapters(tmp_path) -> tuple[torch.nn.Module, dict]:
    base = tiny_llama()
    return base, make_peft_adapters(base, tmp_path)


def test_each_adapter_takes_its_own_rank_and_targets(tmp_path):
    base, paths = adapters(tmp_path)
    layout = BaseLayout.from_model(base)
    lora = LoraModel(copy.deepcopy(base), layout, max_loras=4, max_rank=MAX_RANK, backend=CPU_KERNELS)
    linear = layout.linear
    qv = load_peft_adapter(paths["qv-r4"], layout, MAX_RANK)
    expected = sum(4 * sum(linear[name]) for name in linear if name.endswith(("q_proj", "v_proj")))
    assert lora._pool_blocks(qv)[1] == expected  # rank 4 on q and v only: nothing padded, nothing else
    padded = padded_slot_bytes(layout, MAX_RANK, torch.float32)
    assert expected * 4 * 30 < padded  # a padded slot of rank 64 on every module is over 30x larger


def kernel_case(weights: torch.dtype):
    """Slots 0..4 with ragged ranks (slot 3: not targeted) placed out of order in a pool, and the dense
    padded copies of the same weights."""
    torch.manual_seed(0)
    fan_in, outs, width, slots = 40, (24, 12), 8, 5
    ranks = [[5, 8, 2, 0, 1], [3, 8, 0, 0, 6]]
    pool = AdapterPool(64 * 1024, slots, "cpu", weights, page_bytes=256)
    a_weight = PooledWeight(pool, 2, fan_in, width)
    b_weights = [PooledWeight(pool, 1, out, width) for out in outs]
    a_dense = torch.zeros(slots, 2 * width, fan_in)
    b_dense = [torch.zeros(slots, out, width) for out in outs]
    table = WeightRanks(2, slots, torch.device("cpu"))
    for slot in [4, 1, 3, 0, 2]:
        blocks = [(g, ranks[g][slot]) for g in range(2)]
        elements = sum(r * (fan_in + outs[g]) for g, r in blocks)
        pool.allocate(slot, elements)
        cursor = 0
        for g, r in blocks:
            a = torch.randn(r, fan_in).to(weights)
            b = torch.randn(outs[g], r).to(weights)
            a_weight.place(g, slot, cursor)
            a_weight.block(g, slot, r).copy_(a)
            b_weights[g].place(0, slot, cursor + r * fan_in)
            b_weights[g].block(0, slot, r).copy_(b.t())
            cursor += r * (fan_in + outs[g])
            a_dense[slot, g * width:g * width + r] = a.float()
            b_dense[g][slot, :, :r] = b.float()
            table.set(g, slot, r)
    return fan_in, outs, width, a_weight, b_weights, a_dense, b_dense, table


@pytest.mark.skipif(not load_kernels(), reason="the compiled CPU kernels do not build here")
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("slots,num_decode", [([0, 1, 2, 3, 4, -1, 1, 4], 8), ([1] * 9 + [2, 0, 4, 4, 4], 10),
                                              ([0, 0, 0, 4, 4, 1, 1, 1, 1], 2)])
def test_pooled_kernels_equal_the_reference(weights, slots, num_decode):
    fan_in, outs, width, a_weight, b_weights, a_dense, b_dense, table = kernel_case(weights)
    meta = LoraStepMeta.build(slots, [8] * 5, "cpu", num_decode, max_rank=width, planner=cpu_native.plan_slots)
    x = torch.randn(len(slots), fan_in)
    t = cpu_native.shrink(x, a_weight, meta, ranks=table.group)
    t_ref = REFERENCE.shrink(x, a_dense, meta)
    assert torch.allclose(t, t_ref, atol=1e-4)
    for g, (b_weight, b_ref) in enumerate(zip(b_weights, b_dense)):
        y, y_ref = torch.zeros(len(slots), 50), torch.zeros(len(slots), 50)
        cols = slice(g * width, (g + 1) * width)
        cpu_native.expand_(y, t[:, cols], b_weight, meta, 7, ranks=table.members[g])
        REFERENCE.expand_(y_ref, t_ref[:, cols], b_ref, meta, 7)
        assert torch.allclose(y, y_ref, atol=1e-4)
        assert y[:, :7].abs().sum() == 0 and y[:, 7 + outs[g]:].abs().sum() == 0


@pytest.mark.skipif(not load_kernels(), reason="the compiled CPU kernels do not build here")
def test_mixed_batch_equals_peft_after_eviction_and_compaction(tmp_path):
    """A pool one page short of every adapter: with the first one evicted, the last one fits by bytes but
    in no single hole, so the extents are slid together first; the mixed batch still equals PEFT."""
    base, paths = adapters(tmp_path)
    layout = BaseLayout.from_model(base)
    names = list(paths)
    parsed = [load_peft_adapter(paths[name], layout, MAX_RANK) for name in names]

    def model(pool_bytes: int | None) -> LoraModel:
        return LoraModel(copy.deepcopy(base), layout, max_loras=len(names), max_rank=MAX_RANK, backend=CPU_KERNELS,
                         pool_bytes=pool_bytes, page_bytes=1024)

    probe = model(None)
    sizes = [probe.slot_bytes(adapter) for adapter in parsed]
    assert sizes[0] < sizes[-1]  # qv-r4's hole alone cannot take rslora-r6
    lora = model(sum(sizes) - 1024)
    for slot in range(len(names) - 1):
        lora.write_slot(slot, parsed[slot])
    lora.clear_slot(0)
    lora.write_slot(len(names) - 1, parsed[-1])
    assert lora.pool.compactions == 1 and lora.pool.free_pages == sizes[0] // 1024 - 1
    served = names[1:]
    rows, local = mixed_rows(256, served)
    slots = [s + 1 if s >= 0 else -1 for s in local]
    ours = forward_logits(lora, rows, slots, pad_id=0)
    greedy = generate_batch(lora, rows, slots, 8, [1], 0)
    oracle = peft_oracle(base, {name: paths[name] for name in served})
    checked = assert_rows_match_oracle(oracle, served, rows, local, ours, greedy, 8, 0, [1])
    assert checked == {*served, None}
