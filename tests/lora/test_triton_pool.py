"""The Triton kernels reading the adapter pool (each adapter's blocks at their own rank, found through
per-slot offsets) against the reference on dense copies of the same weights, under Triton's interpreter
(and compiled on a GPU when there is one), decode (BGMV) and prefill (SGMV) alike."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from server.lora import triton_ops  # noqa: E402
from server.lora.ops import REFERENCE  # noqa: E402
from server.lora.pool import AdapterPool, PooledWeight  # noqa: E402
from server.lora.ranks import WeightRanks  # noqa: E402
from server.lora.step import LoraStepMeta  # noqa: E402
from server.lora.triton_plan import plan_segments  # noqa: E402
from tests.lora.test_triton_ops import DEVICES  # noqa: E402

FAN_IN, OUTS, WIDTH, SLOTS = 40, (24, 12), 8, 5
# Per member and slot: ragged ranks, 0 where the slot's adapter does not target the member (slot 3: none).
RANKS = [[5, 8, 2, 0, 1], [3, 8, 0, 0, 6]]


def pooled_case(weights: torch.dtype, device: str):
    """Slots placed out of order in a pool whose every other element is NaN (a kernel that reads outside
    a block, or past a rank, fails), and dense padded copies of the same weights."""
    torch.manual_seed(0)
    pool = AdapterPool(64 * 1024, SLOTS, device, weights, page_bytes=256)
    pool.data.fill_(float("nan"))
    a_weight = PooledWeight(pool, 2, FAN_IN, WIDTH)
    b_weights = [PooledWeight(pool, 1, out, WIDTH) for out in OUTS]
    a_dense = torch.zeros(SLOTS, 2 * WIDTH, FAN_IN)
    b_dense = [torch.zeros(SLOTS, out, WIDTH) for out in OUTS]
    table = WeightRanks(2, SLOTS, torch.device(device))
    for slot in [4, 1, 3, 0, 2]:
        pool.allocate(slot, sum(RANKS[g][slot] * (FAN_IN + OUTS[g]) for g in range(2)))
        cursor = 0
        for g in range(2):
            r = RANKS[g][slot]
            a, b = torch.randn(r, FAN_IN).to(weights), torch.randn(OUTS[g], r).to(weights)
            a_weight.place(g, slot, cursor)
            a_weight.block(g, slot, r).copy_(a)
            b_weights[g].place(0, slot, cursor + r * FAN_IN)
            b_weights[g].block(0, slot, r).copy_(b.t())
            cursor += r * (FAN_IN + OUTS[g])
            a_dense[slot, g * WIDTH:g * WIDTH + r] = a.float()
            b_dense[g][slot, :, :r] = b.float()
            table.set(g, slot, r)
    return a_weight, b_weights, a_dense, b_dense, table


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("slots,path", [([0, 1, 2, 3, 4, -1, 1, 4], "bgmv"),
                                        ([1] * 9 + [-1, 2, 0] + [4] * 5 + [3, 3], "sgmv")], ids=["decode", "prefill"])
def test_pooled_shrink_and_expand_equal_the_reference(device, weights, slots, path):
    a_weight, b_weights, a_dense, b_dense, table = pooled_case(weights, device)
    meta = LoraStepMeta.build(slots, [WIDTH] * SLOTS, device, max_rank=WIDTH, planner=plan_segments)
    x = torch.randn(len(slots), FAN_IN)
    t = triton_ops.shrink(x.to(device), a_weight, meta, path=path, ranks=table.group)
    t_ref = REFERENCE.shrink(x, a_dense, LoraStepMeta.build(slots, [WIDTH] * SLOTS, "cpu"))
    torch.testing.assert_close(t.cpu(), t_ref, atol=1e-4, rtol=1e-4)
    for g, (b_weight, b_ref) in enumerate(zip(b_weights, b_dense)):
        y, y_ref = torch.zeros(len(slots), 50, device=device), torch.zeros(len(slots), 50)
        cols = slice(g * WIDTH, (g + 1) * WIDTH)
        triton_ops.expand_(y, t[:, cols], b_weight, meta, 7, path=path, ranks=table.members[g])
        REFERENCE.expand_(y_ref, t_ref[:, cols], b_ref, LoraStepMeta.build(slots, [WIDTH] * SLOTS, "cpu"), 7)
        torch.testing.assert_close(y.cpu(), y_ref, atol=1e-4, rtol=1e-4)
        assert y[:, :7].abs().sum() == 0 and y[:, 7 + OUTS[g]:].abs().sum() == 0
    # The engine's group op: the shrink's partial sums handed to each member's expand as they are.
    partials = triton_ops.shrink_partials(x.to(device), a_weight, meta, path=path, ranks=table.group)
    for g, b_weight in enumerate(b_weights):
        y = torch.zeros(len(slots), 50, device=device)
        columns = triton_ops.partial_columns(partials, slice(g * WIDTH, (g + 1) * WIDTH))
        triton_ops.expand_(y, columns, b_weight, meta, 7, path=path, ranks=table.members[g])
        y_ref = torch.zeros(len(slots), 50)
        REFERENCE.expand_(y_ref, t_ref[:, g * WIDTH:(g + 1) * WIDTH], b_dense[g],
                          LoraStepMeta.build(slots, [WIDTH] * SLOTS, "cpu"), 7)
        torch.testing.assert_close(y.cpu(), y_ref, atol=1e-4, rtol=1e-4)


def test_pooled_op_needs_the_rank_table():
    a_weight, _, _, _, _ = pooled_case(torch.float32, "cpu")
    meta = LoraStepMeta.build([0, 1], [WIDTH] * SLOTS, "cpu", max_rank=WIDTH, planner=plan_segments)
    with pytest.raises(ValueError, match="ranks"):
        triton_ops.shrink(torch.randn(2, FAN_IN), a_weight, meta)


@pytest.mark.full  # the interpreter runs every layer of the model: about 20 s
def test_pooled_triton_model_equals_peft(tmp_path):
    """The whole LoRA model on the Triton op over the pool (the interpreter on CPU tensors): a mixed batch
    of adapters of ranks 4-16 and their own targets, one forward, equals PEFT's single-adapter forwards."""
    import copy

    from server.adapters.layout import BaseLayout
    from server.adapters.peft_format import load_peft_adapter
    from server.lora.model import LoraModel
    from server.lora.ops import triton_backend
    from tests.conftest import tiny_llama
    from tests.lora.padded_batch import forward_logits
    from tests.lora.peft_fixtures import make_peft_adapters
    from tests.lora.test_peft_equivalence import mixed_rows, oracle_run, peft_oracle

    base = tiny_llama()
    paths = make_peft_adapters(base, tmp_path)
    layout = BaseLayout.from_model(base)
    names = list(paths)
    backend = triton_backend()  # the engine's: over the pool, partial sums straight to the expands
    lora = LoraModel(copy.deepcopy(base), layout, max_loras=len(names), max_rank=64, backend=backend)
    for slot in reversed(range(len(names))):  # extents out of slot order
        lora.write_slot(slot, load_peft_adapter(paths[names[slot]], layout, 64))
    rows, slots = mixed_rows(256, names)
    ours = forward_logits(lora, rows, slots, pad_id=0)
    oracle = peft_oracle(base, paths)
    for row, slot, logits in zip(rows, slots, ours):
        expected, _ = oracle_run(oracle, names[slot] if slot >= 0 else None, row, 1, 0, [1])
        err = (logits - expected).abs().max().item()
        assert err < 1e-3, f"{names[slot] if slot >= 0 else 'base'}: max abs logit error {err}"
