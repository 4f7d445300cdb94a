"""The embedded model served from its GGUF blocks against the same weights in float32, side by side.

    python bench/quantized.py            # single stream (base, one adapter) and 64 concurrent requests
    python bench/quantized.py --quick    # shorter runs
    python bench/quantized.py --kernels  # the kernels alone: microseconds per call, each type, mode and shape

Both engines run in this process with the same threads, one after the other, alternating (A B B A) so
the machine's drift does not enter the ratio; the fastest run of each counts. Single stream: one
request, 128 new tokens (greedy, EOS ignored), on the base and on the shipped adapter `sentiment`.
Concurrent: 64 requests (prompts 16-128 tokens, 32-64 new tokens) on the base. Resident weights: the
bytes of the model's parameters (quantized blocks counted once where tied).
Writes bench/results/quantized.md and quantized.json.

--kernels: `quant_linear` per call (best of 5 timed loops, the same threads) at M = 1, 8, 64 activation rows,
exact and int8 modes (int8 on the layout the int8 mode holds), every type on the weight shapes [out, in] of
SmolLM2-135M (576x576: q/o; 1536x576: gate/up; 576x1536: down) and of a 1B-class Llama's down projection
(2048x8192), beside float32 `F.linear` on the same shape (the dequantized model's matmul). Each call reads a
different copy of its weights (copies past the 32 MiB L3 together), so every shape is timed from memory as in a
decode step. The k-quants need rows of whole 256-weight blocks, so they skip in=576 (llama.cpp's quantizer gives such tensors Q5_0, Q5_1 or Q8_0 instead).
Writes bench/results/quantized-kernels.md and quantized-kernels.json.

--pages: the same calls at M = 1 and 8 on a 1B-class model's gate (Q4_K, 8192x2048) and down (Q6_K, 2048x8192),
the weights read from 4 KiB pages against copies in 2 MiB pages (server/huge_pages.py, as the server holds
them), the two alternated; GB/s of the weights read. Writes bench/results/quantized-pages.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, make_workload, request, run_burst, start_engine, write_json  # noqa: E402
from server.config import Settings  # noqa: E402
from server.engine.engine import Engine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODES = ("dequantize", "keep")
KERNEL_SHAPES = [(576, 576), (1536, 576), (576, 1536), (2048, 8192)]  # [out_features, in_features]
KERNEL_ROWS = (1, 8, 64)
# ggml type: (weights per block, bytes per block, byte offsets of its float16 scales)
KERNEL_TYPES = {"Q4_0": (2, 32, 18, (0,)), "Q4_1": (3, 32, 20, (0, 2)), "Q5_0": (6, 32, 22, (0,)),
                "Q5_1": (7, 32, 24, (0, 2)), "Q8_0": (8, 32, 34, (0,)), "Q2_K": (10, 256, 84, (80, 82)),
                "Q3_K": (11, 256, 110, (108,)), "Q4_K": (12, 256, 144, (0, 2)), "Q5_K": (13, 256, 176, (0, 2)),
                "Q6_K": (14, 256, 210, (208,))}


def resident_weight_bytes(engine: Engine) -> int:
    params = {p.data_ptr(): p for p in engine.base.model.parameters()}
    return sum(p.numel() * p.element_size() for p in params.values())


async def single_stream(engine: Engine, model: str, new: int) -> float:
    prompt = "Input: Maria, 34, from Lisbon thinks the new phone is wonderful.\nOutput:"
    start = time.perf_counter()
    await engine.generate(request(f"single-{model}-{start}", model, prompt, new))
    return new / (time.perf_counter() - start)


def measure(mode: str, args) -> dict:
    settings = Settings(cache_dir=args.cache_dir, device="cpu", adapters_dir=ROOT / "adapters", gguf_blocks=mode,
                        threads=args.threads, max_running=64)
    engine = start_engine(settings)
    try:
        new = 32 if args.quick else 128
        asyncio.run(single_stream(engine, engine.base_name, 8))  # warm-up
        row = {"base_tok_s": asyncio.run(single_stream(engine, engine.base_name, new)),
               "adapter_tok_s": asyncio.run(single_stream(engine, "sentiment", new))}
        work = make_workload(engine.tokenizer, 16 if args.quick else 64, (16, 128), (32, 64), seed=0)
        wall, _ = asyncio.run(run_burst(engine, work, [engine.base_name] * len(work), f"burst-{mode}"))
        row["concurrent_tok_s"] = sum(n for _, n in work) / wall
        row["weights_mib"] = resident_weight_bytes(engine) / 2**20
        return row
    finally:
        engine.stop()


def _microseconds(call, repeats: int = 5, budget_s: float = 0.05, clock=time.perf_counter) -> float:
    """Best time per call over `repeats` loops of about `budget_s` each."""
    call()
    start, loops = clock(), 0
    while clock() - start < budget_s / 4:
        call()
        loops += 1
    per_loop = max(1, int(loops * 4 * budget_s / max(clock() - start, 1e-9) / 4))
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        for _ in range(per_loop):
            call()
        best = min(best, (clock() - start) / per_loop)
    return best * 1e6


def random_blocks(name: str, out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """Blocks of random quants with sane float16 scales (the kernels' speed does not depend on the values)."""
    _, weights, nbytes, halves = KERNEL_TYPES[name]
    blocks = np.random.default_rng(seed).integers(0, 256, (out_features, in_features // weights, nbytes),
                                                   dtype=np.uint8)
    for at in halves:
        blocks[..., at:at + 2] = np.full(blocks.shape[:2] + (1,), 0.01, np.float16).view(np.uint8)
    return torch.from_numpy(blocks.reshape(out_features, -1))


def streamed(tensor: torch.Tensor, total_bytes: int = 96 * 2**20) -> Iterator[torch.Tensor]:
    """Copies of `tensor` in turn, together past the last-level cache: each call reads its weights from memory,
    as a decode step does (it reads every layer once), instead of from a cache a loop of one layer warms."""
    count = max(1, total_bytes // (tensor.numel() * tensor.element_size()))
    return itertools.cycle([tensor.clone() for _ in range(count)])


def kernel_rows(threads: int) -> list[dict]:
    from server.native.loader import load_kernels

    assert load_kernels(), "the compiled CPU kernels could not be built"
    torch.set_num_threads(threads)
    # One thread: every call runs on this thread, whose CPU time leaves out the time other processes hold the
    # core (a shared machine's load); more threads: wall time.
    microseconds = partial(_microseconds, clock=time.thread_time if threads == 1 else time.perf_counter)
    rows = []
    for out_features, in_features in KERNEL_SHAPES:
        weights = streamed(torch.randn(out_features, in_features) * 0.02)
        for m in KERNEL_ROWS:
            x = torch.randn(m, in_features)
            call = partial(lambda x, ws: torch.nn.functional.linear(x, next(ws)), x, weights)
            rows.append({"type": "float32", "shape": f"{out_features}x{in_features}", "m": m,
                         "us": microseconds(call)})
        for name, (qtype, block_weights, _, _) in KERNEL_TYPES.items():
            if in_features % block_weights:
                continue
            file_blocks = random_blocks(name, out_features, in_features)
            # int8 times the layout `QuantLinear(int8=True)` holds (Q4_K, Q6_K reordered where the build has VNNI)
            held, held_type = torch.ops.loraplex.quant_int8_layout(file_blocks, qtype, in_features)
            modes = {"exact": (streamed(file_blocks), qtype), "int8": (streamed(held), held_type)}
            for m in KERNEL_ROWS:
                x, out = torch.randn(m, in_features), torch.empty(m, out_features)
                for mode, (blocks, kernel_type) in modes.items():
                    call = partial(lambda x, bs, *args: torch.ops.loraplex.quant_linear(x, next(bs), *args),
                                   x, blocks, kernel_type, out, mode == "int8")
                    rows.append({"type": name, "mode": mode, "shape": f"{out_features}x{in_features}", "m": m,
                                 "us": microseconds(call)})
        print(f"{out_features}x{in_features} done", flush=True)
    return rows


def kernel_table(rows: list[dict]) -> str:
    """One line per type and shape: microseconds per call for each M and mode, float32's first."""
    header = " | ".join(f"M={m} {mode}" for m in KERNEL_ROWS for mode in ("exact", "int8"))
    lines = [f"| shape [out x in] | weights | {header} |", "| --- | --- |" + " ---: |" * (2 * len(KERNEL_ROWS))]
    by_key = {(r["shape"], r["type"], r.get("mode", "exact"), r["m"]): r["us"] for r in rows}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for name in ("float32", *KERNEL_TYPES):
            if (shape, name, "exact", 1) not in by_key:
                continue
            cells = []
            for m in KERNEL_ROWS:
                for mode in ("exact", "int8"):
                    value = by_key.get((shape, name, mode, m))
                    cells.append("" if value is None else f"{value:.1f}")
            lines.append(f"| {shape} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PAGE_SHAPES = [("Q4_K", 8192, 2048), ("Q6_K", 2048, 8192)]  # a 1B-class Llama's gate and down


def page_rows(threads: int) -> list[dict]:
    from server.huge_pages import in_huge_pages
    from server.native.loader import load_kernels

    assert load_kernels(), "the compiled CPU kernels could not be built"
    torch.set_num_threads(threads)
    rows = []
    for name, out_features, in_features in PAGE_SHAPES:
        qtype = KERNEL_TYPES[name][0]
        file_blocks = random_blocks(name, out_features, in_features)
        held, held_type = torch.ops.loraplex.quant_int8_layout(file_blocks, qtype, in_features)
        for mode, (blocks, kernel_type) in {"exact": (file_blocks, qtype), "int8": (held, held_type)}.items():
            small = list(itertools.islice(streamed(blocks), 96 * 2**20 // blocks.numel()))
            pages = {"4 KiB": itertools.cycle(small), "2 MiB": itertools.cycle([in_huge_pages(b) for b in small])}
            for m in (1, 8):
                x, out = torch.randn(m, in_features), torch.empty(m, out_features)
                best = {size: float("inf") for size in pages}
                for _ in range(3):  # alternated, the best of each
                    for size, copies in pages.items():
                        call = partial(lambda x, bs, *args: torch.ops.loraplex.quant_linear(x, next(bs), *args),
                                       x, copies, kernel_type, out, mode == "int8")
                        best[size] = min(best[size], _microseconds(call, repeats=3, budget_s=0.2))
                rows.append({"type": name, "shape": f"{out_features}x{in_features}", "mode": mode, "m": m,
                             **{f"{size} us": us for size, us in best.items()},
                             **{f"{size} GB/s": blocks.numel() / us / 1e3 for size, us in best.items()}})
                print(rows[-1], flush=True)
    return rows


def pages_main(args) -> None:
    threads = args.threads or torch.get_num_threads()
    rows = page_rows(threads)
    lines = [f"quant_linear from 4 KiB and 2 MiB pages, {threads} threads (GB/s of the weights read)", "",
             "| weights | mode | M | 4 KiB pages | 2 MiB pages | ratio |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        small, huge = r["4 KiB GB/s"], r["2 MiB GB/s"]
        lines.append(f"| {r['type']} {r['shape']} | {r['mode']} | {r['m']} | {small:.1f} | {huge:.1f} | "
                     f"{huge / small:.2f}x |")
    publish("quantized-pages", "\n".join(lines), {"threads": threads, "rows": rows})


def publish(stem: str, table: str, data: dict) -> None:
    """Print the table and write it (bench/results/<stem>.md) and the figures (<stem>.json)."""
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    write_json(f"{stem}.json", data)


def kernels_main(args) -> None:
    threads = args.threads or torch.get_num_threads()
    rows = kernel_rows(threads)
    clock = "CPU time of the calling thread" if threads == 1 else "wall time"
    table = f"quant_linear, microseconds per call ({clock}), {threads} threads\n\n" + kernel_table(rows)
    publish("quantized-kernels", table, {"threads": threads, "rows": rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--kernels", action="store_true", help="time the kernels alone (no engine)")
    parser.add_argument("--pages", action="store_true", help="the kernels from 4 KiB against 2 MiB pages")
    parser.add_argument("--threads", type=int, default=None, help="engine threads (default: torch's)")
    parser.add_argument("--cache-dir", type=Path, default=Settings().cache_dir)
    args = parser.parse_args()
    if args.kernels:
        return kernels_main(args)
    if args.pages:
        return pages_main(args)
    best: dict[str, dict] = {}
    for mode in (*MODES, *reversed(MODES)):
        row = measure(mode, args)
        print(mode, {k: round(v, 1) for k, v in row.items()}, flush=True)
        kept = best.setdefault(mode, row)
        for key in ("base_tok_s", "adapter_tok_s", "concurrent_tok_s"):
            kept[key] = max(kept[key], row[key])
    lines = ["| weights | single stream, base (tok/s) | single stream, adapter (tok/s) | 64 requests, base (tok/s) "
             "| resident weights (MiB) |", "| --- | ---: | ---: | ---: | ---: |"]
    for mode, label in zip(MODES, ("float32 (dequantized)", "GGUF blocks (Q4_1, Q8_0)")):
        r = best[mode]
        lines.append(f"| {label} | {r['base_tok_s']:.1f} | {r['adapter_tok_s']:.1f} | {r['concurrent_tok_s']:.1f} "
                     f"| {r['weights_mib']:.0f} |")
    ratio = {k: best["keep"][k] / best["dequantize"][k] for k in ("base_tok_s", "adapter_tok_s", "concurrent_tok_s")}
    lines.append(f"| blocks / float32 | {ratio['base_tok_s']:.2f}x | {ratio['adapter_tok_s']:.2f}x | "
                 f"{ratio['concurrent_tok_s']:.2f}x | {best['keep']['weights_mib'] / best['dequantize']['weights_mib']:.2f}x |")
    publish("quantized", "\n".join(lines), {"best": best, "ratio": ratio, "quick": args.quick})


if __name__ == "__main__":
    main()
