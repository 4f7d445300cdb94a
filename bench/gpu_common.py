"""What the GPU benchmarks share (bench/gpu_engine.py, bench/gpu_kernels.py): the model shapes they measure
and the card's device-to-device copy bandwidth, the floor their figures are set against."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shape:
    """A Llama-like decoder's shape: the engine bench builds a random model of it, the kernel bench its LoRA
    slot buffers."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    inter: int
    vocab: int
    tied: bool

    @property
    def q(self) -> int:
        """Width of q_proj's output (and o_proj's input)."""
        return self.hidden

    @property
    def kv(self) -> int:
        """Width of k_proj's and v_proj's outputs (grouped-query attention)."""
        return self.hidden * self.kv_heads // self.heads


DEFAULT = Shape("default model (SmolLM2-135M shape)", 576, 30, 9, 3, 1536, 49152, True)
LLAMA7B = Shape("7B-like (Llama-2-7B shape)", 4096, 32, 32, 32, 11008, 32000, False)
TINY = Shape("tiny", 64, 2, 4, 2, 96, 512, True)


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), median of 20 copies of 1 GiB; NaN
    off CUDA (the benches' CPU smoke runs)."""
    if not device.startswith("cuda"):
        return float("nan")
    x = torch.empty(2**29, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    times = []
    for _ in range(22):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del x, y
    return 2 * 2**30 / sorted(times[2:])[len(times[2:]) // 2]
