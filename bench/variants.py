"""Mixed adapter kinds on the 64x32 workload: a quarter of the adapters DoRA, a quarter with a fully
trained lm_head copy (modules_to_save), the rest plain LoRA, against the same workload with every
adapter plain and against the base alone; plus what DoRA's vectors and the copies cost in memory,
and what computing DoRA's `g` costs for a 7B-shaped layer.

    python bench/variants.py           # 64 requests over 32 rank-16 all-linear adapters
    python bench/variants.py --quick   # 8 requests over 4 adapters, 8-24 tokens: a smoke run
    python bench/variants.py --requests 16 --adapters 8 --max-len 64   # a smaller form of the same mix

The three engine runs alternate (A B C C B A, `--repeats` times over, the fastest of each kept), so
their ratios are measured in one run on the same machine state. Writes bench/results/variants.md
and variants.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, in_thread, make_workload, run_burst, start_engine, write_json  # noqa: E402
from server.config import Settings  # noqa: E402
from server.lora.dora import dora_excess  # noqa: E402
from server.models import load_base_model  # noqa: E402
from tests.lora.variant_adapters import save_variant  # noqa: E402
from tests.peft_adapters import save_adapter  # noqa: E402

RUNS = ("base", "plain", "variants")


def make_stores(base, root: Path, count: int) -> dict[str, Path]:
    """Two stores of `count` rank-16 all-linear adapters with the same A and B: all plain, and one whose
    first quarter is DoRA and second quarter carries an lm_head copy."""
    lora = dict(r=16, lora_alpha=32, target_modules="all-linear")
    for i in range(count):
        save_adapter(base, root / "plain" / f"a{i}", seed=i, scale_b=0.05, **lora)
        kind = i * 4 // count
        extra = {0: dict(use_dora=True), 1: dict(modules_to_save=["lm_head"])}.get(kind)
        if extra is None:
            save_adapter(base, root / "variants" / f"a{i}", seed=i, scale_b=0.05, **lora)
        else:
            save_variant(base, root / "variants" / f"a{i}", seed=i, scale_b=0.05, **lora, **extra)
    return {"plain": root / "plain", "variants": root / "variants"}


def run_engine(settings: Settings, work, models: list[str]) -> dict:
    engine = start_engine(settings)
    try:
        warm = [(work[0][0][:40], 2)] * len(set(models))
        asyncio.run(run_burst(engine, warm, sorted(set(models)), "warm"))
        seconds, _ = asyncio.run(run_burst(engine, work, models, "run"))
        return {"seconds": seconds, **memory(engine.lora)}
    finally:
        engine.stop()


def memory(lora) -> dict[str, int]:
    """Bytes the slots hold for DoRA's vectors, the lm_head/embedding LoRA buffers and replaced weights."""
    dora = sum(layer.dora.excess.nbytes for layer in lora.layers.values() if layer.dora is not None)
    special = [layer.nbytes() for layer in lora.special.values()]
    return {"dora_bytes": dora + sum(s[1] for s in special), "special_lora_bytes": sum(s[0] for s in special),
            "saved_bytes": sum(s[2] for s in special)}


def g_cost(repeats: int = 5) -> dict[str, float]:
    """Milliseconds to compute g - 1 for one 4096 x 4096 layer at rank 16 (float32 and bfloat16 base)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 4096, generator=gen) / 64, torch.randn(4096, 16, generator=gen) / 100
    magnitude = torch.rand(4096, generator=gen) + 0.5
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        weight = (torch.randn(4096, 4096, generator=gen) / 64).to(dtype)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            dora_excess(weight, a, b, 2.0, magnitude)
            times.append(time.perf_counter() - start)
        out[str(dtype).removeprefix("torch.")] = 1e3 * statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=32, help="a multiple of 4")
    parser.add_argument("--max-len", type=int, default=256, help="longest prompt and generation (tokens)")
    parser.add_argument("--repeats", type=int, default=1, help="A B C C B A rounds; the fastest of each kind counts")
    parser.add_argument("--cache-dir", type=Path, default=Settings().cache_dir)
    args = parser.parse_args()
    n, count = (8, 4) if args.quick else (args.requests, args.adapters)
    ranges = ((8, 24), (8, 24)) if args.quick else ((16, args.max_len), (16, args.max_len))
    settings = Settings(cache_dir=args.cache_dir, device="cpu", max_loras=count, max_lora_rank=16,
                        max_running=n, max_cpu_loras=count)
    base = in_thread(load_base_model, settings)
    work = make_workload(base.tokenizer, n, *ranges, seed=0)
    runs: dict[str, list[dict]] = {kind: [] for kind in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        stores = in_thread(make_stores, base.model, Path(tmp), count)
        models = {"base": [base.name] * n, "plain": [f"a{i % count}" for i in range(n)]}
        models["variants"] = models["plain"]
        for round_ in range(2 * args.repeats):
            for kind in RUNS if round_ % 2 == 0 else RUNS[::-1]:
                cfg = settings.model_copy(update={"adapters_dir": stores.get(kind, stores["plain"])})
                print(f"running: {kind} ...", file=sys.stderr, flush=True)
                runs[kind].append(run_engine(cfg, work, models[kind]))
                print(f"  {runs[kind][-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    best = {kind: min(r, key=lambda run: run["seconds"]) for kind, r in runs.items()}
    tokens = sum(t for _, t in work)
    result = {"requests": n, "adapters": count, "tokens": tokens, "threads": torch.get_num_threads(),
              "runs": {k: [round(r["seconds"], 1) for r in v] for k, v in runs.items()}, "best": best,
              "variants_over_plain": best["plain"]["seconds"] / best["variants"]["seconds"],
              "plain_over_base": best["base"]["seconds"] / best["plain"]["seconds"], "g_ms": g_cost()}
    text = render(result)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "variants.md").write_text(text)
    write_json("variants.json", result)


def render(r: dict) -> str:
    best, mib = r["best"], 2**20
    lines = [f"# Mixed adapter kinds ({r['requests']}x{r['adapters']}, CPU, {r['threads']} threads)", "",
             "A quarter of the adapters DoRA, a quarter with a trained lm_head copy (modules_to_save), the rest "
             "plain; the same A and B in the all-plain store. Runs alternated in one process.", "",
             "| run | output tok/s | seconds (each run) |", "| --- | ---: | --- |"]
    for kind in RUNS:
        lines.append(f"| {kind} | {r['tokens'] / best[kind]['seconds']:.1f} | {r['runs'][kind]} |")
    v = best["variants"]
    lines += ["", f"- variants / plain throughput: {r['variants_over_plain']:.2f}; plain / base: {r['plain_over_base']:.2f}",
              f"- memory with every adapter in a slot: DoRA vectors {v['dora_bytes'] / mib:.1f} MiB, lm_head LoRA "
              f"buffers {v['special_lora_bytes'] / mib:.1f} MiB, lm_head copies {v['saved_bytes'] / mib:.1f} MiB",
              f"- g for a 4096x4096 layer at rank 16: {r['g_ms']['float32']:.1f} ms (float32 base), "
              f"{r['g_ms']['bfloat16']:.1f} ms (bfloat16 base), once per slot write"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
