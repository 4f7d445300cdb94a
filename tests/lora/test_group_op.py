"""The fused group op (every member's shrink and expand in one call) equals the separate pooled ops."""

from __future__ import annotations

import pytest
import torch

from server.lora import cpu_native
from server.lora.cpu_group import group_delta_
from server.lora.step import LoraStepMeta
from server.native.loader import load_kernels
from tests.lora.test_pool import kernel_case

pytestmark = pytest.mark.skipif(not load_kernels(), reason="the compiled CPU kernels do not build here")


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("slots,num_decode", [([0, 1, 2, 3, 4, -1, 1, 4], 8), ([1] * 9 + [2, 0, 4, 4, 4], 10),
                                              ([0, 0, 0, 4, 4, 1, 1, 1, 1], 2), ([2], 1), ([-1, -1], 2)])
def test_group_op_equals_the_separate_ops(weights, slots, num_decode):
    fan_in, outs, width, a_weight, b_weights, _, _, table = kernel_case(weights)
    meta = LoraStepMeta.build(slots, [8] * 5, "cpu", num_decode, max_rank=width, planner=cpu_native.plan_slots)
    x = torch.randn(len(slots), fan_in)
    start = torch.randn(len(slots), 50)
    t = cpu_native.shrink(x, a_weight, meta, ranks=table.group)
    separate = start.clone()
    for g, b_weight in enumerate(b_weights):
        cpu_native.expand_(separate, t[:, g * width:(g + 1) * width], b_weight, meta, 7 + 20 * g,
                           ranks=table.members[g])
    fused = start.clone()
    ys = [fused[:, 7 + 20 * g:7 + 20 * g + out] for g, out in enumerate(outs)]  # strided views of one buffer
    group_delta_(x, ys, a_weight, b_weights, meta, table.group)
    torch.testing.assert_close(fused, separate, atol=1e-5, rtol=1e-5)
    base_rows = [i for i, s in enumerate(slots) if s < 0 or s == 3]  # slot 3's adapter targets neither member
    assert torch.equal(fused[base_rows], start[base_rows])


def test_group_op_checks_its_inputs():
    fan_in, outs, width, a_weight, b_weights, _, _, table = kernel_case(torch.float32)
    meta = LoraStepMeta.build([0, 1], [8] * 5, "cpu", 2, max_rank=width, planner=cpu_native.plan_slots)
    x = torch.randn(2, fan_in)
    with pytest.raises(RuntimeError, match="one output and one B per member"):
        group_delta_(x, [torch.zeros(2, outs[0])], a_weight, b_weights, meta, table.group)
    a_weight.place(0, 0, 10**9)  # a block outside the pool is refused before any thread reads
    with pytest.raises(RuntimeError, match="outside the pool"):
        group_delta_(x, [torch.zeros(2, o) for o in outs], a_weight, b_weights, meta, table.group)
