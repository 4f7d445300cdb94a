"""The batched LoRA op against a per-token loop, for sorted and unsorted tokens with base tokens mixed in."""

from __future__ import annotations

import pytest
import torch

from server.lora.mapping import LoraContext, LoraMapping
from server.lora.ops import add_lora_, gathered_lora, grouped_lora, padded_lora

S, R, IN, OUT = 5, 8, 12, 10


def reference(x, a, b, slots):
    y = torch.zeros(x.shape[0], OUT)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            y[t] = b[s] @ (a[s] @ x[t])
    return y


@pytest.mark.parametrize("impl", [grouped_lora, gathered_lora, padded_lora])
@pytest.mark.parametrize("slots", [
    [0, 0, 1, 3, 3, 3, -1, -1],          # engine order: grouped, base last
    [2, -1, 0, 4, 2, -1, 0, 1, 4, 4],    # arbitrary order
    [-1, -1, -1],                        # base only
    [3],                                 # one decode token
])
def test_add_lora_matches_per_token_loop(impl, slots):
    torch.manual_seed(0)
    slots_t = torch.tensor(slots)
    a, b = torch.randn(S, R, IN), torch.randn(S, OUT, R)
    x = torch.randn(len(slots), IN)
    ranks = [R] * S
    mapping = LoraMapping.build(slots_t, ranks)
    y = torch.zeros(len(slots), OUT)
    if mapping.num_lora_tokens:
        add_lora_(y, x, a, b, mapping, impl)
    assert torch.allclose(y, reference(x, a, b, slots_t), atol=1e-5)


def test_mapping_sorted_input_needs_no_permutation():
    mapping = LoraMapping.build(torch.tensor([0, 0, 2, -1]), [4, 8, 16])
    assert mapping.order is None
    assert mapping.offsets.tolist() == [2, 2, 3]
    assert mapping.num_lora_tokens == 3
    assert mapping.rank == 16  # slot 1 is unused, so only slots 0 and 2 count


def test_rank_slice_skips_padding_but_keeps_values():
    torch.manual_seed(1)
    a, b = torch.zeros(2, R, IN), torch.zeros(2, OUT, R)
    a[:, :3], b[:, :, :3] = torch.randn(2, 3, IN), torch.randn(2, OUT, 3)
    slots = torch.tensor([1, 0, 1])
    x = torch.randn(3, IN)
    mapping = LoraMapping.build(slots, [3, 3])
    assert mapping.rank == 3
    y = torch.zeros(3, OUT)
    add_lora_(y, x, a, b, mapping, grouped_lora)
    assert torch.allclose(y, reference(x, a, b, slots), atol=1e-5)


def test_context_per_row_expands_to_tokens():
    ctx = LoraContext(num_slots=3, device=torch.device("cpu"))
    ctx.slot_ranks[:] = [4, 4, 4]
    ctx.set_row_slots(torch.tensor([2, -1, 0]))
    mapping = ctx.mapping_for(6)  # 3 rows x 2 tokens
    assert mapping.num_tokens == 6 and mapping.num_lora_tokens == 4
    assert ctx.mapping_for(6) is mapping  # cached for the other layers of the same pass
    with pytest.raises(RuntimeError):
        ctx.mapping_for(7)
    ctx.clear()
    assert ctx.mapping_for(6) is None


def test_padded_path_is_chosen_for_decode_steps_only():
    ranks = [R] * S
    decode = LoraMapping.build(torch.tensor([0, 1, 2, 3, 4, 4]), ranks)  # 5 slots x 2 rows for 6 tokens
    prefill = LoraMapping.build(torch.tensor([0] * 40 + [1]), ranks)    # 5 x 40 rows for 41 tokens
    assert decode.padded and not prefill.padded
    torch.manual_seed(3)
    a, b = torch.randn(S, R, IN), torch.randn(S, OUT, R)
    for slots, mapping in [([0, 1, 2, 3, 4, 4], decode), ([0] * 40 + [1], prefill)]:
        x = torch.randn(len(slots), IN)
        y = torch.zeros(len(slots), OUT)
        add_lora_(y, x, a, b, mapping, grouped_lora)
        assert torch.allclose(y, reference(x, a, b, torch.tensor(slots)), atol=1e-4)
