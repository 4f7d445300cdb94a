"""Microbenchmark of the Triton LoRA kernels on a CUDA GPU: one decode step's LoRA work over every
layer of a model shape, against a torch gather+bmm reference and against the card's copy bandwidth.

    python bench/gpu_kernels.py                  # default model + 7B-like shape, batch 32, 32 rank-16 adapters
    python bench/gpu_kernels.py --out results.md

Per layer the runner's calls: one shrink over stacked q/k/v A + three expands, o_proj, one shrink
over stacked gate/up A + two expands, down_proj. Every layer has its own slot buffers, so a step
streams the adapters' weights from device memory (not L2), as a real decode step does. A step is
captured in a CUDA graph and its replays are timed with events (median); launch gaps from Python
are reported apart. Achieved bandwidth = bytes of LoRA weights the step must read / step time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import time

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_common import DEFAULT, LLAMA7B, Shape, copy_bandwidth  # noqa: E402
from server.lora import triton_ops  # noqa: E402
from server.lora.step import LoraStepMeta  # noqa: E402
from server.lora.triton_plan import plan_segments  # noqa: E402


SHAPES = [DEFAULT, LLAMA7B]


DEVICE = "cuda"


def make_meta(slots: list[int], ranks: list[int]) -> LoraStepMeta:
    return LoraStepMeta.build(slots, ranks, DEVICE, planner=plan_segments)


class Layer:
    """One layer's slot buffers: stacked A per group, B per projection."""

    def __init__(self, shape: Shape, slots: int, rank: int, dtype: torch.dtype) -> None:
        def rand(*size: int) -> torch.Tensor:
            return torch.randn(*size, device=DEVICE, dtype=dtype) * 0.02

        h = shape.hidden
        self.groups = [  # (A stacked [S, n*R, in], [B [S, out, R]], input width, output widths)
            (rand(slots, 3 * rank, h), [rand(slots, shape.q, rank), rand(slots, shape.kv, rank),
                                        rand(slots, shape.kv, rank)], h),
            (rand(slots, rank, shape.q), [rand(slots, h, rank)], shape.q),
            (rand(slots, 2 * rank, h), [rand(slots, shape.inter, rank), rand(slots, shape.inter, rank)], h),
            (rand(slots, rank, shape.inter), [rand(slots, h, rank)], shape.inter),
        ]

    def weight_bytes(self, used_slots: int, slots: int) -> int:
        total = sum(a.numel() * a.element_size() + sum(b.numel() * b.element_size() for b in bs)
                    for a, bs, _ in self.groups)
        return total * used_slots // slots


def triton_layer(layer: Layer, xs, ys, meta, rank: int, shrink_only: bool = False, path: str = "auto",
                 fused: bool = False) -> None:
    """The runner's calls per the contract (shrink, then expand_ per slice); `fused`: one `lora_`
    per group instead (two launches: shrink partials, then one multi-slice expand)."""
    for (a, bs, _), x, y in zip(layer.groups, xs, ys):
        if fused:
            offsets = [sum(b.shape[1] for b in bs[:j]) for j in range(len(bs))]
            triton_ops.lora_(y, x, a, bs, meta, offsets, slice_rank=rank, path=path)
            continue
        t = triton_ops.shrink(x, a, meta, slice_rank=rank, path=path)
        if shrink_only:
            continue
        off = 0
        for j, b in enumerate(bs):
            triton_ops.expand_(y, t[:, j * rank:(j + 1) * rank], b, meta, off, path=path)
            off += b.shape[1]


def torch_layer(layer: Layer, xs, ys, slots_t: torch.Tensor, rank: int) -> None:
    """The gather+bmm reference (ops.gathered_lora's method): copies each token's A and B."""
    for (a, bs, _), x, y in zip(layer.groups, xs, ys):
        t = torch.bmm(a[slots_t], x.unsqueeze(2)).squeeze(2)  # [N, nR]
        off = 0
        for j, b in enumerate(bs):
            y[:, off:off + b.shape[1]] += torch.bmm(b[slots_t], t[:, j * rank:(j + 1) * rank, None]).squeeze(2)
            off += b.shape[1]


def time_graph(fn, reps: int = 50) -> float:
    """Median microseconds of one replay of `fn` captured in a CUDA graph."""
    if DEVICE != "cuda":
        return time_eager(fn, reps=1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def time_eager(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    if DEVICE != "cuda":  # the --smoke run: checks the script, times nothing meaningful
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def bench_shape(shape: Shape, batch: int, adapters: int, rank: int, dtype, copy_gbs: float,
                slots: list[int], label: str, path: str) -> str:
    torch.manual_seed(0)
    layers = [Layer(shape, adapters, rank, dtype) for _ in range(shape.layers)]
    meta = make_meta(slots, [rank] * adapters)
    slots_t = torch.tensor(slots, device=DEVICE)
    xs = [torch.randn(batch, w, device=DEVICE, dtype=dtype) for _, _, w in layers[0].groups]
    ys = [torch.zeros(batch, sum(b.shape[1] for b in bs), device=DEVICE, dtype=dtype) for _, bs, _ in layers[0].groups]
    used = len(set(s for s in slots if s >= 0))
    wbytes = sum(layer.weight_bytes(used, adapters) for layer in layers)

    # Correctness of the whole step against the reference, on fresh outputs.
    ys_ref = [y.clone() for y in ys]
    for layer in layers[:2]:
        triton_layer(layer, xs, ys, meta, rank, path=path)
        torch_layer(layer, xs, ys_ref, slots_t, rank)
    ys_fused = [torch.zeros_like(y) for y in ys]
    for layer in layers[:2]:
        triton_layer(layer, xs, ys_fused, meta, rank, path=path, fused=True)
    err = max(((y.double() - r.double()).norm() / r.double().norm()).item()
              for y, r in zip(ys + ys_fused, ys_ref + ys_ref))

    def run(shrink_only: bool, fused: bool = False):
        return lambda: [triton_layer(layer, xs, ys, meta, rank, shrink_only, path, fused) for layer in layers]

    step_us = time_graph(run(False))
    fused_us = time_graph(run(False, True))
    shrink_us = time_graph(run(True))
    eager_us = time_eager(run(False))
    ref_us = time_graph(lambda: [torch_layer(layer, xs, ys, slots_t, rank) for layer in layers])
    floor_us = wbytes / (copy_gbs * 1e3)
    return (f"| {shape.name} | {label} | {wbytes / 1e6:.1f} | {floor_us:.0f} | {step_us:.0f} | "
            f"{wbytes / step_us / 1e3:.0f} | {step_us / floor_us:.2f}x | {fused_us:.0f} | "
            f"{wbytes / fused_us / 1e3:.0f} | {shrink_us:.0f} | {eager_us:.0f} | "
            f"{ref_us:.0f} | {ref_us / step_us:.1f}x | {err:.1e} |")


def bench_prefill(shape: Shape, tokens: int, adapters: int, rank: int, dtype) -> str:
    """One layer-group (gate/up + down) over a prefill chunk split among `adapters` segments."""
    torch.manual_seed(0)
    layer = Layer(shape, adapters, rank, dtype)
    slots = [i * adapters // tokens for i in range(tokens)]
    meta = make_meta(slots, [rank] * adapters)
    slots_t = torch.tensor(slots, device=DEVICE)
    xs = [torch.randn(tokens, w, device=DEVICE, dtype=dtype) for _, _, w in layer.groups]
    ys = [torch.zeros(tokens, sum(b.shape[1] for b in bs), device=DEVICE, dtype=dtype) for _, bs, _ in layer.groups]
    ys_ref = [y.clone() for y in ys]
    triton_layer(layer, xs, ys, meta, rank)
    torch_layer(layer, xs, ys_ref, slots_t, rank)
    err = max(((y.double() - r.double()).norm() / r.double().norm()).item() for y, r in zip(ys, ys_ref))
    tri = time_graph(lambda: triton_layer(layer, xs, ys, meta, rank))
    ref = time_graph(lambda: torch_layer(layer, xs, ys, slots_t, rank))
    act = sum(x.numel() * x.element_size() for x in xs) + 2 * sum(y.numel() * y.element_size() for y in ys)
    return (f"| {shape.name} | {tokens} tokens, {adapters} segments | {tri:.0f} | {act / tri / 1e3:.0f} | "
            f"{ref:.0f} | {ref / tri:.1f}x | {err:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (interpreter): checks the script")
    args = parser.parse_args()
    global DEVICE, SHAPES
    dtype = torch.bfloat16
    if args.smoke:
        DEVICE = "cpu"
        SHAPES = [Shape("smoke", 32, 2, 4, 2, 48, 512, True)]
        args.batch, args.adapters = 6, 4
        name = "CPU (Triton interpreter, smoke run: timings meaningless)"
    else:
        props = torch.cuda.get_device_properties(0)
        name = f"{props.name}, {props.multi_processor_count} SMs"

    lines = [f"GPU: {name}; torch {torch.__version__}, triton {triton.__version__}; bfloat16", ""]
    copy_gbs = copy_bandwidth(DEVICE) / 1e9
    lines += [f"Device-to-device copy (1 GiB, read + write): {copy_gbs:.0f} GB/s", ""]
    lines += ["Decode step, every layer's LoRA work (4 shrinks + 7 expands per layer), CUDA graph replay, "
              "microseconds (median of 50):", "",
              "| shape | tokens -> adapters | LoRA weight MB read | floor us (MB / copy GB/s) | Triton step us | "
              "achieved GB/s | vs floor | fused step (lora_) us | its GB/s | shrinks only us | "
              "eager (no graph) us | torch gather+bmm us | speed-up | rel err vs torch |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    b, n = args.batch, args.adapters
    distinct = [i % n for i in range(b)]
    four = [i * 4 // b for i in range(b)]
    scenarios = [(distinct, f"{b} -> {min(b, n)} distinct (BGMV)", "auto"),
                 (four, f"{b} -> 4 adapters, sorted (SGMV)", "auto"),
                 (four, f"{b} -> 4 adapters, sorted, forced BGMV", "bgmv")]
    for shape in SHAPES:
        for slots, label, path in scenarios:
            lines.append(bench_shape(shape, b, n, args.rank, dtype, copy_gbs, slots, label, path))
            print(lines[-1], flush=True)
    lines += ["", "Prefill, one layer (q/k/v, o, gate/up, down), CUDA graph replay, microseconds:", "",
              "| shape | chunk | Triton us | activation GB/s | torch gather+bmm us | speed-up | rel err |",
              "|---|---|---|---|---|---|---|"]
    for shape in SHAPES:
        lines.append(bench_prefill(shape, 64 if args.smoke else 512, 4, args.rank, dtype))
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
