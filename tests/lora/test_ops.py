"""The LoRA op's backends (compiled CPU kernels, CPU batched matmuls, torch reference) against a
per-token loop, over every layout the step plan produces: decode rows sorted or not, uniform or
ragged, heavy slots, prefill segments, base rows mixed in, stacked A with strided column slices of
the shrink output, and ranks below the buffers' width (not multiples of 8) that the kernels skip;
float32 and bfloat16 weights beside float32 activations; widths that take the kernels' vector
loops, their single-vector steps and their scalar tails."""

from __future__ import annotations

import pytest
import torch

from server.native.loader import load_kernels
from server.lora.ops import CPU, CPU_KERNELS, REFERENCE, add_lora_, backend_for
from server.lora.ranks import WeightRanks
from server.lora.step import DeviceTables, LoraStepMeta
from server.lora.triton_plan import plan_segments

BACKENDS = [CPU_KERNELS, CPU, REFERENCE]


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels():
    assert load_kernels(), "the CPU LoRA kernels must build here (a C++ compiler and ninja are installed)"

S, R, IN, OUT = 5, 8, 12, 10
# (in, out): scalar only; 64-wide unrolled steps + one vector + a tail; whole vectors only.
SHAPES = [(IN, OUT), (85, 37), (128, 64)]
WEIGHT_DTYPES = [torch.float32, torch.bfloat16]


def reference(x, a, b, slots):
    """Per token, in float64 over the weights' exact values, returned in x's dtype."""
    y = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float64)
    for t, s in enumerate(slots):
        if s >= 0:
            y[t] = b[s].double() @ (a[s].double() @ x[t].double())
    return y.to(x.dtype)


CASES = [
    ([0, 0, 1, 1, 2, 2, 3, 3, 4, 4], 10),           # decode, uniform: the pure-view path
    ([0, 1, 2, 3, 4, -1, -1], 7),                    # one token per slot, base rows after
    ([0, 0, 1, 3, 3, 3, -1, -1], 8),                 # ragged counts and a gap in the slots
    ([2, -1, 0, 4, 2, -1, 0, 1, 4, 4], 10),          # arbitrary order
    ([0] * 9 + [1, 2], 11),                          # one heavy slot: its run becomes a segment
    # prefill chunks of 3, 33, 70 and 5 rows: the kernels' units of 16 rows (33: a last unit of one row), tiles of 4
    ([1, 1] + [0] * 3 + [2] * 33 + [-1] * 2 + [4] * 70 + [3] * 5, 2),
    ([0, 1, 1, 2, 3, 3, 3, 3, 3, 3, -1, 4, 4, 4, 2, 2, -1, 0], 4),  # decode then prefill chunks
    ([3, 3, 3, -1, -1, 1, 1], 0),                    # prefill only
    ([-1, -1, -1], 3),                               # base only
    ([3], 1),                                        # one decode token
]


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("slots,num_decode", CASES)
@pytest.mark.parametrize("fan_in,fan_out", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("weights", WEIGHT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_shrink_expand_match_per_token_loop(backend, slots, num_decode, fan_in, fan_out, weights):
    torch.manual_seed(0)
    a, b = torch.randn(S, R, fan_in).to(weights), torch.randn(S, fan_out, R).to(weights)
    x = torch.randn(len(slots), fan_in)
    meta = LoraStepMeta.build(slots, [R] * S, "cpu", num_decode, max_rank=R, planner=backend.plan)
    y = torch.randn(len(slots), fan_out)
    expected = y + reference(x, a, b, slots)
    add_lora_(y, x, a, b, meta, backend)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
    t = backend.shrink(x, a, meta)
    if backend is CPU:
        t = t.dense(meta)
    assert t.shape == (len(slots), R)
    assert not t[torch.tensor(slots) < 0].any()  # base rows are zero
    lora_rows = torch.tensor(slots) >= 0
    torch.testing.assert_close(t[lora_rows], torch.stack([a[s].float() @ x[i] for i, s in enumerate(slots) if s >= 0])
                               if lora_rows.any() else t[lora_rows], atol=1e-4, rtol=1e-4)


def zero_past_rank(a: torch.Tensor, b: torch.Tensor, ranks: list[int]) -> None:
    """The slot buffers' invariant: A rows and B columns at or past each slot's rank are zero."""
    for s, r in enumerate(ranks):
        a[s, r:] = 0
        b[s, :, r:] = 0


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("slots,num_decode", CASES[:6])
@pytest.mark.parametrize("ranks", [[R] * S, [3, 8, 5, 1, 7]], ids=["full", "ragged"])
@pytest.mark.parametrize("fan_in,outs", [(IN, (10, 6, 6)), (85, (37, 16, 16))], ids=["small", "vector"])
@pytest.mark.parametrize("weights", WEIGHT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_stacked_shrink_and_expand_into_column_slices(backend, slots, num_decode, ranks, fan_in, outs, weights):
    """q/k/v style: A stacked to [S, 3R, in], one shrink, three expands on strided slices of t and y."""
    torch.manual_seed(1)
    a = [torch.randn(S, R, fan_in).to(weights) for _ in outs]
    b = [torch.randn(S, o, R).to(weights) for o in outs]
    for a_g, b_g in zip(a, b):
        zero_past_rank(a_g, b_g, ranks)
    x = torch.randn(len(slots), fan_in)
    meta = LoraStepMeta.build(slots, ranks, "cpu", num_decode, max_rank=R, planner=backend.plan)
    y = torch.randn(len(slots), sum(outs))
    expected = y.clone()
    t = backend.shrink(x, torch.cat(a, dim=1), meta)
    offset = 0
    for g, out in enumerate(outs):
        expected[:, offset:offset + out] += reference(x, a[g], b[g], slots)
        backend.expand_(y, backend.columns(t, slice(g * R, (g + 1) * R)), b[g], meta, offset)
        offset += out
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_buffers(dtype):
    torch.manual_seed(2)
    slots, num_decode = CASES[5]
    a, b = torch.randn(S, R, IN, dtype=dtype), torch.randn(S, OUT, R, dtype=dtype)
    x = torch.randn(len(slots), IN, dtype=dtype)
    meta = LoraStepMeta.build(slots, [R] * S, "cpu", num_decode, planner=CPU.plan)
    y = torch.zeros(len(slots), OUT, dtype=dtype)
    add_lora_(y, x, a, b, meta, CPU)
    expected = reference(x.float(), a.float(), b.float(), slots)
    torch.testing.assert_close(y.float(), expected, atol=0.1, rtol=0.05)


def test_plan_uniform_decode_needs_no_index():
    slots = [0, 0, 1, 1, 2, 2, -1]
    meta = LoraStepMeta.build(slots, [4, 8, 16], "cpu", num_decode=7, planner=CPU.plan)
    padded = meta.plan
    assert (padded.pad_slots, padded.pad_width, padded.pad_count) == (3, 2, 6)
    assert padded.pad_rows is None and padded.pad_index is None and padded.pad_gather is None
    assert padded.host_segments == () and meta.num_lora_tokens == 6
    segments = plan_segments(slots, 7, DeviceTables("cpu"))
    assert segments.starts.tolist() == [0, 2, 4] and segments.lens.tolist() == [2, 2, 2]
    assert segments.num_segments == 3 and segments.max_seg_len == 2


def test_plan_heavy_decode_slot_and_prefill_become_segments():
    slots = [0] * 9 + [1, 2] + [2, 2, 2, -1, 1]
    meta = LoraStepMeta.build(slots, [8, 8, 8], "cpu", num_decode=11, planner=CPU.plan)
    assert meta.plan.host_segments == ((0, 9, 0), (11, 3, 2), (15, 1, 1))
    assert (meta.plan.pad_slots, meta.plan.pad_width, meta.plan.pad_count) == (3, 1, 2)
    assert meta.token_slots.tolist() == slots
    # every run: decode runs merge with the prefill run of slot 2
    assert plan_segments(slots, 11, DeviceTables("cpu")).slots.tolist() == [0, 1, 2, 1]
    assert meta.num_decode == 11


def test_only_the_backends_own_plan_is_built_and_read():
    """A step carries the plan of the backend it was built for; another backend refuses it."""
    slots = [0, 1, -1]
    assert LoraStepMeta.build(slots, [4, 4], "cpu", 3).plan is None  # the reference reads the core only
    meta = LoraStepMeta.build(slots, [4, 4], "cpu", 3, max_rank=4, planner=CPU_KERNELS.plan)
    with pytest.raises(TypeError, match="batched-matmul"):
        CPU.shrink(torch.randn(3, 8), torch.randn(2, 4, 8), meta)
    REFERENCE.shrink(torch.randn(3, 8), torch.randn(2, 4, 8), meta)  # any plan: the core suffices


def test_device_tables_reuse_their_buffers_when_staged():
    """The staged path (pinned buffers on CUDA) hands out slices of one buffer per dtype, restarted per step."""
    tables = DeviceTables("cpu", staged=True)  # the staging without pinned memory
    tables.begin()
    first, second, ranks = tables([1, 2, 3]), tables([4, 5]), tables([6], torch.int32)
    tables.end()
    assert first.tolist() == [1, 2, 3] and second.tolist() == [4, 5] and ranks.dtype == torch.int32
    assert second.data_ptr() == first.data_ptr() + 3 * first.element_size()  # one buffer per dtype
    tables.begin()
    again = tables([7, 8, 9])
    assert again.data_ptr() == first.data_ptr() and again.tolist() == [7, 8, 9]
    assert tables(list(range(3000))).tolist() == list(range(3000))  # grows past its first size


def test_kernel_plan_holds_every_lora_row_per_slot():
    """Decode rows and prefill chunks alike go to the kernels' CSR (one call per weight), each slot's
    decode rows first, base rows nowhere."""
    long = 9
    slots = [1, 0, 1, -1, 3] + [2] * long + [0, 0, -1, 4]
    meta = LoraStepMeta.build(slots, [4] * 5, "cpu", num_decode=5 + long, max_rank=4, planner=CPU_KERNELS.plan)
    plan = meta.plan
    assert plan.ptr.tolist() == [0, 3, 5, 5 + long, 6 + long, 7 + long]
    assert plan.rows.tolist() == [1, 14, 15, 0, 2, *range(5, 5 + long), 4, 17]
    assert LoraStepMeta.build([-1, -1], [4], "cpu", planner=CPU_KERNELS.plan).plan.ptr is None


@pytest.mark.parametrize("fan_in,fan_out", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("weights", WEIGHT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_kernels_read_only_up_to_each_rank(fan_in, fan_out, weights):
    """Garbage past a slot's rank is never read, by the kernels (decode rows) nor by the matmuls of
    prefill segments: both stop at the rank (the other backends need zeros there)."""
    torch.manual_seed(3)
    slots, ranks = [0, 1, 1, 2, 2, 2] + [1] * 5 + [-1] + [2] * 9, [2, 5, 8]
    a, b = torch.randn(3, R, fan_in).to(weights), torch.randn(3, fan_out, R).to(weights)
    zero_past_rank(a, b, ranks)
    x = torch.randn(len(slots), fan_in)
    expected = reference(x, a, b, slots)
    for s, r in enumerate(ranks):
        a[s, r:], b[s, :, r:] = float("nan"), float("nan")
    y = torch.zeros(len(slots), fan_out)
    meta = LoraStepMeta.build(slots, ranks, "cpu", 6, max_rank=R, planner=CPU_KERNELS.plan)
    add_lora_(y, x, a, b, meta, CPU_KERNELS)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


# Per member (q, k, v) and slot: the rank of the slot's adapter in that member, 0 = not targeted.
# Slots 0-2 target q and v only (PEFT's default), 3 has its own rank per member (a rank_pattern),
# 4 targets all three; the untargeted half-front of the slots tests the kernels' split of the work.
MEMBER_RANKS = [[5, 0, 8, 3, 8], [0, 0, 0, 6, 8], [5, 0, 8, 1, 8]]


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("slots,num_decode", CASES[:7])
@pytest.mark.parametrize("fan_in,outs", [(IN, (10, 6, 6)), (85, (37, 16, 16))], ids=["small", "vector"])
@pytest.mark.parametrize("weights", WEIGHT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_each_member_read_only_up_to_its_own_rank(backend, slots, num_decode, fan_in, outs, weights):
    """With the weights' `RankTable`, a module a slot's adapter does not target, and every row past
    its rank in that module, is never read: NaN there changes nothing (the kernels skip it; the other
    backends ignore the table and so are given zeros)."""
    torch.manual_seed(4)
    ranks = WeightRanks(len(outs), S, torch.device("cpu"))
    for g, member in enumerate(MEMBER_RANKS):
        for slot, rank in enumerate(member):
            ranks.set(g, slot, rank)
    a = [torch.randn(S, R, fan_in).to(weights) for _ in outs]
    b = [torch.randn(S, o, R).to(weights) for o in outs]
    for a_g, b_g, member in zip(a, b, MEMBER_RANKS):
        zero_past_rank(a_g, b_g, member)
    x = torch.randn(len(slots), fan_in)
    y = torch.randn(len(slots), sum(outs))
    expected = y.clone()
    offset = 0
    for g, out in enumerate(outs):
        expected[:, offset:offset + out] += reference(x, a[g], b[g], slots)
        offset += out
    if backend is CPU_KERNELS:
        for a_g, b_g, member in zip(a, b, MEMBER_RANKS):
            for slot, rank in enumerate(member):
                a_g[slot, rank:], b_g[slot, :, rank:] = float("nan"), float("nan")
    meta = LoraStepMeta.build(slots, [8] * S, "cpu", num_decode, max_rank=R, planner=backend.plan)
    t = backend.shrink(x, torch.cat(a, dim=1), meta, ranks=ranks.group)
    offset = 0
    for g, out in enumerate(outs):
        backend.expand_(y, backend.columns(t, slice(g * R, (g + 1) * R)), b[g], meta, offset,
                        ranks=ranks.members[g])
        offset += out
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


def test_weight_ranks_follow_writes_and_row_moves():
    ranks = WeightRanks(2, 4, torch.device("cpu"))
    ranks.set(0, 1, 8)
    ranks.set(1, 1, 4)
    ranks.set(0, 3, 16)
    assert ranks.masks == [0b1010, 0b0010]
    ranks.set(0, 1, 0)
    assert ranks.masks == [0b1000, 0b0010]
    ranks.move_rows(torch.tensor([0, 1, 3]), torch.tensor([1, 3, 0]))  # 1 -> 0, 3 -> 1, 0 -> 3
    assert ranks.group.host == [[0, 16, 0, 0], [4, 0, 0, 0]]
    assert ranks.group.table.tolist() == ranks.group.host
    assert ranks.masks == [0b0010, 0b0001]
    assert ranks.members[1].table.tolist() == [[4, 0, 0, 0]] and ranks.members[1].host == [[4, 0, 0, 0]]


def test_step_mask_names_the_rows_in_use():
    assert LoraStepMeta.build([2, 2, -1, 0], [8] * 3, "cpu", 4).row_mask == 0b101
    assert LoraStepMeta.build([-1, -1], [8] * 3, "cpu", 2).row_mask == 0


def test_backend_for_cpu_picks_the_kernels_in_float32():
    cpu = torch.device("cpu")
    assert backend_for(cpu) is CPU_KERNELS
    assert backend_for(cpu, torch.float32, "compiled") is CPU_KERNELS
    assert backend_for(cpu, torch.float32, "bmm") is CPU
    assert backend_for(cpu, torch.bfloat16) is CPU
    assert backend_for(torch.device("meta")) is REFERENCE
    with pytest.raises(ValueError):
        backend_for(cpu, torch.float32, "fast")
