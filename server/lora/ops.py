"""The batched multi-adapter LoRA op.

Every token of a step carries one adapter slot (-1 = base). Tokens are grouped by slot
(base tokens last) and all adapters of the step are applied in one grouped matmul,
with no Python loop over adapters. Shapes, for a step of N tokens:

    x        [N, in]        input activations, rows ordered as `mapping.order` says
    a        [S, R, in]     per-slot A, zero-padded past each adapter's rank
    b        [S, out, R]    per-slot B with the adapter's scale folded in
    y        [N, out]       base output, updated in place:
                            y[t] += b[s] @ (a[s] @ x[t])  for every token t with slot s >= 0
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from server.lora.mapping import LoraMapping

Impl = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, LoraMapping], torch.Tensor]


def grouped_lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: LoraMapping) -> torch.Tensor:
    """Segmented matmul (SGMV): x [n_lora, in] sorted by slot -> delta [n_lora, out]."""
    shrunk = torch._grouped_mm(x, a.transpose(1, 2), offs=m.offsets)
    return torch._grouped_mm(shrunk, b.transpose(1, 2), offs=m.offsets)


def gathered_lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: LoraMapping) -> torch.Tensor:
    """Gather-then-bmm (BGMV): the reference, and the fallback where grouped matmul is unsupported."""
    slots = m.sorted_slots
    shrunk = torch.bmm(x.unsqueeze(1), a[slots].transpose(1, 2))
    return torch.bmm(shrunk, b[slots].transpose(1, 2)).squeeze(1)


def padded_lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: LoraMapping) -> torch.Tensor:
    """Batched matmul over every slot, each slot's tokens padded to the step's largest count.

    For decode-heavy steps (a few tokens per adapter) this beats the grouped matmul by 3-4x
    on the CPU: one bmm over the slot buffers as they lie, no per-group dispatch. It wastes
    work on padding, so the mapping picks it only when padding is small (`m.padded`).
    """
    slots, width = a.shape[0], m.max_count
    padded = x.new_zeros(slots * width, x.shape[1]).index_copy_(0, m.pad_index, x)
    shrunk = torch.bmm(padded.view(slots, width, -1), a.transpose(1, 2))
    out = torch.bmm(shrunk, b.transpose(1, 2))
    return out.view(slots * width, -1).index_select(0, m.pad_index)


def select_impl(device: torch.device, dtype: torch.dtype) -> Impl:
    """Grouped matmul on the CPU and on Hopper-class GPUs in bfloat16; gather elsewhere."""
    if device.type == "cpu":
        return grouped_lora
    if device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9:
        return grouped_lora
    return gathered_lora


def add_lora_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: LoraMapping, impl: Impl) -> None:
    """y[t] += b[s] @ a[s] @ x[t] for every token t whose slot s is not -1 (see module docstring)."""
    n = m.num_lora_tokens
    rank = m.rank
    a, b = a[:, :rank], b[:, :, :rank]  # ranks past the step's largest adapter are zero padding
    impl = padded_lora if m.padded else impl
    if m.order is None:
        y[:n] += impl(x[:n], a, b, m)
    else:
        rows = m.order[:n]
        # index_put_ (rows are unique): index_add_ is orders of magnitude slower on the CPU.
        y.index_put_((rows,), impl(x.index_select(0, rows), a, b, m), accumulate=True)
