"""The LoRA op alone: every shrink and expand of one decode step of the default model, out of cache,
against the bytes it must read and this machine's read bandwidth.

    python bench/lora_op.py                        # 64 rows over 32 rank-16 all-linear slots
    python bench/lora_op.py --rows 32 --ranks 8,16,32,64
    python bench/lora_op.py --prefill              # a prefill step: 512 rows of prompt chunks, 32 adapters

With `--prefill` the rows are prompt chunks of 15-200 rows each, one adapter per chunk (the step of a burst
of short prompts), and the kernels' one call per weight runs beside one matmul per segment per weight (the
op's prefill path before them) in the same buffers; the table gives GFLOP/s instead of the bytes.

Each layer's buffers are its own tensors (as in the model), so a step reads every slot's A and B
from memory once: the floor is those bytes at the read bandwidth measured here. The variants
(the compiled kernels with float32 or bfloat16 weights, the batched-matmul fallback) alternate
step by step, so the machine's drift over minutes does not enter their ratios. No base model
work in between: `bench/step.py` times the op inside whole steps. Writes bench/results/lora_op.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, in_thread, read_bandwidth  # noqa: E402
from server.adapters.layout import BaseLayout  # noqa: E402
from server.config import Settings  # noqa: E402
from server.lora.model import _group_names  # noqa: E402
from server.lora.ops import CPU, CPU_KERNELS, Backend  # noqa: E402
from server.lora.step import LoraStepMeta  # noqa: E402
from server.models import load_base_model  # noqa: E402
from server.native.loader import load_kernels  # noqa: E402

VARIANTS: dict[str, tuple[Backend, torch.dtype]] = {
    "kernels, float32": (CPU_KERNELS, torch.float32),
    "kernels, bfloat16": (CPU_KERNELS, torch.bfloat16),
    "batched matmuls, float32": (CPU, torch.float32),
}


class StepBuffers:
    """Per group of one model: stacked A `[S, members * R, in]` and each member's B `[S, out, R]`,
    in the layouts `backend` reads (as server/lora/layers.py keeps them), zero past each slot's rank."""

    def __init__(self, layout: BaseLayout, slots: int, ranks: list[int], backend: Backend, dtype: torch.dtype) -> None:
        width = max(ranks)
        self.groups = []
        for names in _group_names(layout):
            fan_in = layout.linear[names[0]][0]
            a = torch.randn(slots, len(names) * width, fan_in) / fan_in ** 0.5
            for g in range(len(names)):
                for s, r in enumerate(ranks):
                    a[s, g * width + r:(g + 1) * width] = 0
            if backend.a_storage_in_major:
                a = a.transpose(1, 2).contiguous().transpose(1, 2)
            bs = []
            for name in names:
                b = torch.randn(slots, width, layout.linear[name][1]) * 0.01
                for s, r in enumerate(ranks):
                    b[s, r:] = 0
                bs.append(b.to(dtype).transpose(1, 2))  # [S, out, R], out contiguous
            self.groups.append((a.to(dtype), bs))

    def bytes_read(self, ranks: list[int]) -> int:
        """A and B bytes of every slot up to its rank: what a step must read."""
        total = 0
        for a, bs in self.groups:
            members, fan_in = len(bs), a.shape[2]
            total += sum(r * (members * fan_in + sum(b.shape[1] for b in bs)) for r in ranks) * a.element_size()
        return total


def one_step(buffers: StepBuffers, backend: Backend, meta: LoraStepMeta, xs: dict[int, torch.Tensor],
             ys: dict[int, torch.Tensor], width: int) -> float:
    start = time.perf_counter()
    for a, bs in buffers.groups:
        t = backend.shrink(xs[a.shape[2]], a, meta)
        for g, b in enumerate(bs):
            part = t if len(bs) == 1 else backend.columns(t, slice(g * width, (g + 1) * width))
            backend.expand_(ys[b.shape[1]], part, b, meta, 0)
    return time.perf_counter() - start


def per_segment_step(buffers: StepBuffers, segments: list[tuple[int, int, int]], xs: dict[int, torch.Tensor],
                     ys: dict[int, torch.Tensor], width: int) -> float:
    """One matmul per (segment, weight) over the padded buffers: the op's prefill path before the kernels
    took prompt chunks (each segment's shrink into its rows of t, each member's expand into its rows of y)."""
    start = time.perf_counter()
    for a, bs in buffers.groups:
        x = xs[a.shape[2]]
        t = x.new_zeros(x.shape[0], a.shape[1])
        for first, length, slot in segments:
            torch.mm(x[first:first + length], a[slot].t(), out=t[first:first + length])
        for g, b in enumerate(bs):
            y = ys[b.shape[1]]
            for first, length, slot in segments:
                y[first:first + length].addmm_(t[first:first + length, g * width:(g + 1) * width], b[slot].t())
    return time.perf_counter() - start


def prefill_segments(rows: int, slots: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """(first row, length, slot) chunks of 15-200 rows filling `rows`, slots round-robin."""
    gen, segments, first = torch.Generator().manual_seed(seed), [], 0
    while first < rows:
        length = min(rows - first, int(torch.randint(15, 201, (1,), generator=gen)))
        segments.append((first, length, len(segments) % slots))
        first += length
    return segments


def flops(layout: BaseLayout, rows: int, rank: int) -> float:
    return 2.0 * rows * rank * sum(fan_in + fan_out for fan_in, fan_out in layout.linear.values())


def prefill(args: argparse.Namespace, layout: BaseLayout, name: str) -> str:
    """Kernels against one matmul per segment on one prefill step, alternated step by step."""
    segments = prefill_segments(args.rows, args.slots)
    slots = [s for first, length, s in segments for _ in range(length)]
    ranks = [int(args.ranks.split(",")[0])] * args.slots
    width = ranks[0]
    meta = LoraStepMeta.build(slots, ranks, "cpu", 0, width, planner=CPU_KERNELS.plan)
    buffers = StepBuffers(layout, args.slots, ranks, CPU_KERNELS, torch.float32)
    dims = {d for fan_in, fan_out in layout.linear.values() for d in (fan_in, fan_out)}
    xs = {d: torch.randn(args.rows, d) for d in dims}
    ys = {d: torch.zeros(args.rows, d) for d in dims}
    runs = {"kernels, one call per weight": lambda: one_step(buffers, CPU_KERNELS, meta, xs, ys, width),
            "one matmul per segment per weight": lambda: per_segment_step(buffers, segments, xs, ys, width)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for step in range(args.steps + 2):
        for k, run in runs.items():
            seconds = run()
            if step >= 2:
                times[k].append(seconds)
    work = flops(layout, args.rows, width)
    lines = [f"# The LoRA op alone on a prefill step ({name}, {args.rows} rows in {len(segments)} prompt chunks of "
             f"15-200 rows over {args.slots} rank-{width} all-linear slots, {torch.get_num_threads()} threads)\n",
             "Median of the steps; variants alternate step by step.\n",
             "| variant | ms per step | GFLOP/s |", "| --- | ---: | ---: |"]
    for k in runs:
        ms = statistics.median(times[k]) * 1e3
        lines.append(f"| {k} | {ms:.2f} | {work / ms / 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="decode rows (one token per sequence)")
    parser.add_argument("--slots", type=int, default=32, help="distinct adapters, rows spread round-robin")
    parser.add_argument("--ranks", default="16", help="comma-separated ranks, cycled over the slots")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per variant (the median counts)")
    parser.add_argument("--prefill", action="store_true", help="a prefill step of prompt chunks (--rows 512)")
    args = parser.parse_args()
    if not load_kernels():
        sys.exit("the compiled CPU kernels could not be built")
    base = in_thread(load_base_model, Settings(device="cpu"))
    layout = BaseLayout.from_model(base.model)
    if args.prefill:
        if args.rows == 64:
            args.rows = 512
        text = prefill(args, layout, base.name)
        print(text)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "lora_op-prefill.md").write_text(text)
        return
    cycle = [int(r) for r in args.ranks.split(",")]
    ranks = [cycle[s % len(cycle)] for s in range(args.slots)]
    width = max(ranks)
    slots = [i % args.slots for i in range(args.rows)]
    metas = {name: LoraStepMeta.build(slots, ranks, "cpu", args.rows, width, planner=backend.plan)
             for name, (backend, _) in VARIANTS.items()}  # each backend reads its own plan
    buffers = {name: StepBuffers(layout, args.slots, ranks, backend, dtype)
               for name, (backend, dtype) in VARIANTS.items()}
    dims = {d for fan_in, fan_out in layout.linear.values() for d in (fan_in, fan_out)}
    xs = {d: torch.randn(args.rows, d) for d in dims}
    ys = {d: torch.zeros(args.rows, d) for d in dims}
    bandwidth = in_thread(read_bandwidth)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for step in range(args.steps + 2):
        for name, (backend, _) in VARIANTS.items():
            seconds = one_step(buffers[name], backend, metas[name], xs, ys, width)
            if step >= 2:  # the first steps build the kernels' caches and fault pages in
                times[name].append(seconds)
    lines = [f"# The LoRA op alone ({base.name}, {args.rows} decode rows over {args.slots} slots, ranks "
             f"{args.ranks}, all linear modules, {torch.get_num_threads()} threads)\n",
             f"Read bandwidth {bandwidth / 1e9:.1f} GB/s (a sum over 512 MiB). Floor: the step's A and B bytes "
             "at that bandwidth. Median of the steps; variants alternate step by step.\n",
             "| variant | ms per step | MB read | GB/s | floor ms | floor / measured |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in VARIANTS:
        ms = statistics.median(times[name]) * 1e3
        nbytes = buffers[name].bytes_read(ranks)
        floor_ms = nbytes / bandwidth * 1e3
        lines.append(f"| {name} | {ms:.2f} | {nbytes / 1e6:.1f} | {nbytes / ms / 1e6:.1f} | {floor_ms:.2f} | "
                     f"{floor_ms / ms:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lora_op.md").write_text(text)


if __name__ == "__main__":
    main()
