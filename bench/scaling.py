"""Throughput and latency against the number of registered adapters, and hot-load latency.

    python bench/scaling.py                 # 1, 10, 100, 1000 adapters; Zipf and uniform; 64 requests each
    python bench/scaling.py --quick         # 1, 10, 100 adapters, 8 requests: a smoke run

Adapters: ranks cycling over `--ranks` (default 4, 8, 16, 32, 64, 8, 16, 4), target sets cycling over
q/v, attention, MLP and all-linear, written straight as safetensors (float16, slices of one random
pool), so a thousand cost seconds. Every count gets its own store (hard links) and a fresh engine
whose adapter pool is sized to what `--pool-slots` padded rank-16 slots take (unset: the server's
default pool; `--max-loras` caps the count), with `--max-cpu-loras` parsed adapters in CPU memory,
both well below the larger counts, so the tiers really swap. The report states how many of these
adapters the pool holds against the padded slots of the same bytes (rank 16, and rank 64, the rank
a padded slot needs to take every adapter of the mix), and the pool's evictions and delayed admissions. Requests are drawn with a fixed seed, Zipf(s) over a seeded permutation of the
adapters, and uniformly, from the same prompts; both run on one engine per count (Zipf first).

Per count and distribution: output tokens/s, TTFT and inter-token latency p50/p99, and the
throughput ratio to the same requests all on one adapter, run on the same engine. This machine's
speed drifts by 5-20% over minutes, so the runs interleave: `--repeats` rounds of (one adapter,
each distribution) and a last one-adapter run, each round's draws with their own seed (other
adapters, so a later round does not find an earlier one's in memory); the fastest run of each
kind counts, as in bench/throughput.py, and the ratio is fastest draw / fastest one-adapter run.
Target: 1000 adapters >= 0.90 of 1.

Hot loads (on the largest count's engine, nothing else running): TTFT of the first request for
an adapter that is only on disk, minus TTFT of the next request for the same, now resident,
adapter; p50 and p99 over `--hot-loads` adapters. The engines run without prefix caching: the runs
of one engine repeat the same prompts, and a hit would skip prefills the 1-adapter runs paid for
(and make the resident request of a hot-load pair skip its prefill).
Writes bench/results/scaling.md and scaling.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (RESULTS, TARGET_SETS, in_thread, latency_summary, make_workload,  # noqa: E402
                          percentile, request, run_burst, start_engine, stream_one, write_json,
                          write_random_adapter)
from server.adapters.layout import BaseLayout  # noqa: E402
from server.config import Settings  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.lora.model import padded_slot_bytes  # noqa: E402
from server.lora.pool import AdapterPool  # noqa: E402
from server.models import load_base_model  # noqa: E402

TARGET_CYCLE = ("qv", "attn", "qv", "mlp", "qv", "all", "qv", "attn")
RANK_CYCLE = (4, 8, 16, 32, 64, 8, 16, 4)
PADDED_RANK = 16  # the padded slots the pool is compared with


def adapter_kinds(count: int, ranks: tuple[int, ...]) -> list[tuple[int, str]]:
    """(rank, target set) of adapter i, for i < count."""
    return [(ranks[i % len(ranks)], TARGET_CYCLE[i % len(TARGET_CYCLE)]) for i in range(count)]


def write_adapters(root: Path, layout: BaseLayout, count: int, ranks: tuple[int, ...]) -> list[str]:
    """`count` cheap adapters under root/all; ranks follow `ranks`, target sets TARGET_CYCLE."""
    pool = torch.randn(8 * 2**20, generator=torch.Generator().manual_seed(0))
    names = []
    start = time.perf_counter()
    for i, (rank, targets) in enumerate(adapter_kinds(count, ranks)):
        name = f"s{i:04d}"
        write_random_adapter(root / "all" / name, layout, rank=rank, targets=TARGET_SETS[targets], seed=i,
                             dtype=torch.float16, pool=pool)
        names.append(name)
    print(f"wrote {count} adapters in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return names


def store_of(root: Path, names: list[str]) -> Path:
    """A store folder holding exactly `names`, hard-linked from root/all (no bytes copied)."""
    store = root / f"n{len(names)}"
    for name in names:
        (store / name).mkdir(parents=True)
        for file in (root / "all" / name).iterdir():
            os.link(file, store / name / file.name)
    return store


def pool_capacity(layout: BaseLayout, pool_bytes: int, kinds: list[tuple[int, str]]) -> dict:
    """How many adapters of the mix the pool holds (their mean size in pool pages, float32 as the engine
    keeps them) against padded slots of the same bytes, at rank 16 and at the mix's largest rank."""
    pool = AdapterPool(pool_bytes, 1, "meta", torch.float32)
    sizes = [pool.bytes_for(rank * sum(sum(layout.linear[n]) for n in layout.linear
                                       if n.rpartition(".")[2] in TARGET_SETS[targets]))
             for rank, targets in kinds]
    mean = sum(sizes) / len(sizes)
    top = max(rank for rank, _ in kinds)
    return {"pool_bytes": pool.nbytes, "mean_adapter_bytes": mean, "pool_holds": pool.nbytes / mean,
            "padded_slots_rank16": pool.nbytes / padded_slot_bytes(layout, PADDED_RANK, torch.float32),
            f"padded_slots_rank{top}": pool.nbytes / padded_slot_bytes(layout, top, torch.float32),
            "max_rank": top}


def draw(names: list[str], n: int, dist: str, s: float, seed: int) -> list[str]:
    """`n` adapter names: uniform, or Zipf(s) over a seeded permutation (rank k has weight 1 / k^s)."""
    rng = random.Random(seed)
    if dist == "uniform":
        return [rng.choice(names) for _ in range(n)]
    order = names[:]
    rng.shuffle(order)
    weights = [1 / (k + 1) ** s for k in range(len(order))]
    return rng.choices(order, weights=weights, k=n)


def run_count(engine: Engine, work, models: list[str], tag: str) -> dict:
    seconds, timings = asyncio.run(run_burst(engine, work, models, tag))
    tokens = sum(n for _, n in work)
    return {"seconds": seconds, "tok_s": tokens / seconds, "distinct": len(set(models)), **latency_summary(timings)}


def hot_loads(engine: Engine, names: list[str], used: set[str], trials: int, prompt: str) -> dict:
    """TTFT for disk-only adapters minus TTFT for the same adapter once resident, engine otherwise idle."""
    registry = engine.registry
    cold_names = [n for n in names if n not in used and not registry.in_cpu(registry.get(n))][:trials]
    cold, warm = [], []

    async def first_token(name: str, tag: str) -> float:
        timing = await stream_one(engine, request(tag, name, prompt, 1))
        return timing.ttft

    for i, name in enumerate(cold_names):
        cold.append(asyncio.run(first_token(name, f"cold-{i}")))
        warm.append(asyncio.run(first_token(name, f"warm-{i}")))
    diff = [c - w for c, w in zip(cold, warm)]
    ms = lambda xs, q: 1e3 * percentile(xs, q)  # noqa: E731
    return {"trials": len(diff), "cold_p50_ms": ms(cold, 50), "cold_p99_ms": ms(cold, 99),
            "resident_p50_ms": ms(warm, 50), "resident_p99_ms": ms(warm, 99),
            "extra_p50_ms": ms(diff, 50), "extra_p99_ms": ms(diff, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="*", default=[1, 10, 100, 1000])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-loras", type=int, default=None, help="cap on adapters resident (unset: the pool's)")
    parser.add_argument("--pool-slots", type=int, default=None,
                        help="size the adapter pool to what this many padded rank-16 slots take (unset: default pool)")
    parser.add_argument("--ranks", type=int, nargs="*", default=list(RANK_CYCLE), help="adapter ranks, cycled")
    parser.add_argument("--max-cpu-loras", type=int, default=64, help="parsed adapters in CPU memory")
    parser.add_argument("--max-running", type=int, default=32)
    parser.add_argument("--zipf-s", type=float, default=1.0)
    parser.add_argument("--dists", nargs="*", default=["zipf", "uniform"])
    parser.add_argument("--hot-loads", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of draws per count (the fastest counts)")
    parser.add_argument("--quick", action="store_true", help="1, 10, 100 adapters, 8 requests of 8-16 tokens")
    parser.add_argument("--prompt-range", type=int, nargs=2, default=[16, 128], help="prompt tokens, min max")
    parser.add_argument("--new-range", type=int, nargs=2, default=[16, 128], help="new tokens, min max")
    parser.add_argument("--cache-dir", type=Path, default=Settings().cache_dir)
    args = parser.parse_args()
    prompt_range, new_range = ((8, 16), (8, 16)) if args.quick else (tuple(args.prompt_range), tuple(args.new_range))
    if args.quick:
        args.counts, args.requests, args.max_cpu_loras, args.hot_loads = [1, 10, 100], 8, 8, 5
        args.repeats = 1
        args.pool_slots = args.pool_slots or 4

    ranks = tuple(args.ranks)
    settings = Settings(cache_dir=args.cache_dir, device="cpu", max_loras=args.max_loras,
                        max_cpu_loras=args.max_cpu_loras, max_running=args.max_running, max_lora_rank=max(ranks),
                        prefix_cache=False)
    base = in_thread(load_base_model, settings)
    layout = BaseLayout.from_model(base.model)
    if args.pool_slots:
        pool_bytes = args.pool_slots * padded_slot_bytes(layout, PADDED_RANK, torch.float32)
        settings = settings.model_copy(update={"lora_pool_gb": pool_bytes / 2**30})
    work = make_workload(base.tokenizer, args.requests, prompt_range, new_range, args.seed)
    runs: dict[str, dict[int, dict]] = {d: {} for d in args.dists}
    pools: dict[int, dict] = {}
    hot: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        everyone = in_thread(write_adapters, root, layout, max(args.counts), ranks)
        for count in sorted(args.counts):
            names = everyone[:count]
            cfg = settings.model_copy(update={"adapters_dir": store_of(root, names)})
            start = time.perf_counter()
            engine = start_engine(cfg)
            print(f"{count} adapters: engine ready in {time.perf_counter() - start:.1f} s", file=sys.stderr,
                  flush=True)
            try:
                asyncio.run(run_burst(engine, [(work[0][0], 2)] * 2, [base.name, names[0]], "warm"))
                used: set[str] = {names[0]}
                single = [names[0]] * len(work)  # the same requests, all on one adapter
                one, draws = [], {dist: [] for dist in args.dists}
                for round_ in range(args.repeats):
                    one.append(run_count(engine, work, single, f"one-{count}-{round_}"))
                    for dist in args.dists:
                        models = draw(names, len(work), dist, args.zipf_s, args.seed + round_)
                        used.update(models)
                        draws[dist].append(run_count(engine, work, models, f"{dist}-{count}-{round_}"))
                        print(f"  {dist}: {draws[dist][-1]['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
                one.append(run_count(engine, work, single, f"one-{count}-last"))
                one_tok_s = [run["tok_s"] for run in one]
                print(f"  one adapter: {', '.join(f'{t:.1f}' for t in one_tok_s)} tok/s", file=sys.stderr, flush=True)
                for dist in args.dists:
                    fastest = max(draws[dist], key=lambda run: run["tok_s"])
                    runs[dist][count] = {**fastest, "one_tok_s": one_tok_s,
                                         "draw_tok_s": [run["tok_s"] for run in draws[dist]],
                                         "ratio": fastest["tok_s"] / max(one_tok_s)}
                pools[count] = dataclasses.asdict(engine.stats().adapter_pool)
                if count == max(args.counts) and args.hot_loads:
                    hot = {"count": count, **hot_loads(engine, names, used, args.hot_loads, work[0][0])}
                pool_bytes = engine.lora.capacity_bytes
            finally:
                engine.stop()
    capacity = pool_capacity(layout, pool_bytes, adapter_kinds(max(args.counts), ranks))
    meta = {"threads": in_thread(torch.get_num_threads), "requests": args.requests, "max_loras": args.max_loras,
            "pool_slots": args.pool_slots, "ranks": ranks, "capacity": capacity, "pools": pools,
            "max_cpu_loras": args.max_cpu_loras, "max_running": args.max_running, "zipf_s": args.zipf_s,
            "repeats": args.repeats,
            "prompt_range": prompt_range, "new_range": new_range, "quick": args.quick, "model": base.name}
    text = render(runs, hot, meta)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else f"-pool{args.pool_slots}" if args.pool_slots else ""
    (RESULTS / f"scaling{suffix}.md").write_text(text)
    write_json(f"scaling{suffix}.json", {"meta": meta, "runs": {d: {str(c): r for c, r in v.items()} for d, v in runs.items()},
                                "hot_load": hot})


def _pool_line(meta: dict) -> str:
    cap = meta["capacity"]
    sized = (f"the memory of {meta['pool_slots']} padded rank-{PADDED_RANK} slots" if meta["pool_slots"]
             else "the default size")
    return f"an adapter pool of {cap['pool_bytes'] / 2**20:.0f} MiB ({sized})"


def _capacity_line(cap: dict) -> str:
    top = cap["max_rank"]
    return (f"The pool holds {cap['pool_holds']:.1f} adapters of this mix (mean {cap['mean_adapter_bytes'] / 2**20:.2f} "
            f"MiB each, float32), against {cap['padded_slots_rank16']:.1f} padded rank-16 slots of the same bytes "
            f"({cap['pool_holds'] / cap['padded_slots_rank16']:.1f}x; rank-16 slots cannot take the rank 32 and 64 "
            f"adapters at all) and {cap[f'padded_slots_rank{top}']:.1f} padded rank-{top} slots, which can "
            f"({cap['pool_holds'] / cap[f'padded_slots_rank{top}']:.1f}x).\n")


def render(runs: dict[str, dict[int, dict]], hot: dict, meta: dict) -> str:
    pr, nr = meta["prompt_range"], meta["new_range"]
    out = [f"# Scaling with the number of adapters ({meta['model']}, CPU, {meta['threads']} threads"
           f"{', quick' if meta['quick'] else ''})\n",
           f"{meta['requests']} requests at once (at most {meta['max_running']} running), prompts {pr[0]}-{pr[1]} "
           f"tokens, {nr[0]}-{nr[1]} new tokens, greedy; {_pool_line(meta)}, {meta['max_cpu_loras']} "
           f"adapters in the CPU tier; ranks {'/'.join(map(str, meta['ranks']))} (cycled), mixed target sets; "
           f"Zipf s={meta['zipf_s']}.\n",
           _capacity_line(meta["capacity"]),
           f"\"one adapter\": the same requests all on one adapter, on the same engine, interleaved with "
           f"{meta['repeats']} round(s) of draws (each with its own seed); the fastest run of each kind counts "
           "(all runs in scaling.json), and the ratio is fastest draw / fastest one-adapter run.\n",
           "| requests drawn | adapters | distinct in run | output tok/s | one adapter tok/s | ratio to one "
           "| TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for dist, by_count in runs.items():
        for count, r in sorted(by_count.items()):
            out.append(f"| {dist} | {count} | {r['distinct']} | {r['tok_s']:.1f} | {max(r['one_tok_s']):.1f} "
                       f"| {r['ratio']:.2f} "
                       f"| {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} "
                       f"| {r['itl_p99_ms']:.1f} |")
    out.append("\nTarget: 1000 adapters >= 0.90 of one adapter.\n")
    out += ["Adapter pool after each count's runs:\n", "| adapters | resident | evictions | admissions delayed "
            "| compactions | used MiB |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for count, pool in sorted(meta["pools"].items()):
        out.append(f"| {count} | {pool['resident']} | {pool['evictions']} | {pool['admissions_delayed']} "
                   f"| {pool['compactions']} | {pool['used_bytes'] / 2**20:.1f} |")
    out.append("")
    if hot:
        out += [f"Hot loads ({hot['trials']} adapters that were only on disk, {hot['count']} registered, engine "
                "otherwise idle, 1 new token):\n", "| | p50 ms | p99 ms |", "| --- | ---: | ---: |",
                f"| TTFT, disk-only adapter | {hot['cold_p50_ms']:.1f} | {hot['cold_p99_ms']:.1f} |",
                f"| TTFT, same adapter resident | {hot['resident_p50_ms']:.1f} | {hot['resident_p99_ms']:.1f} |",
                f"| hot-load cost (difference) | {hot['extra_p50_ms']:.1f} | {hot['extra_p99_ms']:.1f} |"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
