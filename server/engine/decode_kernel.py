"""Decode attention by the compiled CPU kernel (`loraplex::paged_decode_attention`,
server/native/attention_kernels.cpp), and whether it applies: float32 on the CPU, when the kernels build.

The kernel takes each (decoding sequence, kv head) pair, reads that sequence's cache blocks in place up to its
own length (its sliding window only, where the layer has one) and shares one pass over them among the query
heads of the group; the torch path (`attention._decode_attention`) gathers the blocks instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, get_args

import torch

from server.config import CpuAttentionKernel
from server.native.loader import load_kernels

if TYPE_CHECKING:
    from server.engine.attention import AttentionOptions
    from server.engine.kv_cache import KVCache
    from server.engine.step_plan import StepAttention

CPU_ATTENTION_KERNELS = get_args(CpuAttentionKernel)  # the `--cpu-attention-kernel` choices


def decode_attention_kernel(query: torch.Tensor, cache: KVCache, layer: int, step: StepAttention,
                            scale: float, options: AttentionOptions) -> torch.Tensor:
    """The step's decode rows of `query [1, H, T, D]` attended by the kernel: `[n_decode, H, D]`."""
    q = query[0, :, step.decode_rows].transpose(0, 1)  # [n_decode, num_heads, head_dim]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    decode_kernel_into(q, cache, layer, step, scale, options, out)
    return out


def decode_kernel_into(q: torch.Tensor, cache: KVCache, layer: int, step: StepAttention, scale: float,
                       options: AttentionOptions, out: torch.Tensor) -> None:
    """`out [n_decode, H, D]` = the decode rows' attention, `q [n_decode, H, D]` (head_dim contiguous)."""
    tables = step.decode_blocks.view(step.decode_rows.numel(), -1)
    sinks = None if options.sinks is None else options.sinks.detach().float().contiguous()
    torch.ops.loraplex.paged_decode_attention(q, cache.keys[layer], cache.values[layer], tables, step.decode_lens,
                                              scale, options.window or 0, options.softcap or 0.0, sinks, out)


def decode_kernel_applies(device: torch.device, dtype: torch.dtype, choice: CpuAttentionKernel) -> bool:
    """Whether decode attention runs the compiled CPU kernel (float32 on the CPU): `choice` "auto" uses it
    when it builds, "compiled" requires it (RuntimeError otherwise), "torch" never builds it."""
    if choice not in CPU_ATTENTION_KERNELS:
        raise ValueError(f"choice must be one of {CPU_ATTENTION_KERNELS}, got {choice!r}")
    if device.type != "cpu" or dtype != torch.float32 or choice == "torch":
        return False
    if load_kernels():
        return True
    if choice == "compiled":
        raise RuntimeError("--cpu-attention-kernel compiled: the CPU kernels could not be built (see the log)")
    return False
