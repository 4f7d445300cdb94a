"""The embedded model served from its GGUF blocks against the same weights in float32, side by side.

    python bench/quantized.py            # single stream (base, one adapter) and 64 concurrent requests
    python bench/quantized.py --quick    # shorter runs

Both engines run in this process with the same threads, one after the other, alternating (A B B A) so
the machine's drift does not enter the ratio; the fastest run of each counts. Single stream: one
request, 128 new tokens (greedy, EOS ignored), on the base and on the shipped adapter `sentiment`.
Concurrent: 64 requests (prompts 16-128 tokens, 32-64 new tokens) on the base. Resident weights: the
bytes of the model's parameters (quantized blocks counted once where tied).
Writes bench/results/quantized.md and quantized.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, make_workload, request, run_burst, start_engine, write_json  # noqa: E402
from server.config import Settings  # noqa: E402
from server.engine.engine import Engine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODES = ("dequantize", "keep")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="engine threads (default: torch's)")
    parser.add_argument("--cache-dir", type=Path, default=Settings().cache_dir)
    args = parser.parse_args()
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
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quantized.md").write_text(table + "\n")
    write_json("quantized.json", {"best": best, "ratio": ratio, "quick": args.quick})


if __name__ == "__main__":
    main()
