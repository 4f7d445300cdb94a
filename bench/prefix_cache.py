"""Prefix caching on a shared long prefix: time to first token and throughput, cache on vs off.

Workload: every request starts with the same ~1,000-token system prompt and ends with its own
short question; requests go round-robin over the shipped adapters (each adapter's blocks are its
own: the first request of each misses) and, with `--base`, the base model. Two passes per setting,
each on a fresh engine: one request at a time (the TTFT a lone client sees) and all at once
(throughput and TTFT under load). Greedy, EOS ignored, the default model on this machine's device.

    nice -n 19 .venv/bin/python bench/prefix_cache.py   # a few minutes on 2 idle CPU cores
    nice -n 19 .venv/bin/python bench/prefix_cache.py --requests 8 --new-tokens 8   # quicker

Writes bench/results/prefix-cache.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from common import RESULTS, ROOT, latency_summary, request, run_burst, start_engine, stream_one, write_json

from server.config import Settings  # noqa: E402

ADAPTERS = ["extract-json", "sentiment", "shout", "template"]
SYSTEM = ("You are the support assistant of a company that sells hiking gear. Answer in one short sentence, "
          "name the product when you can, and never promise a delivery date. ")


def system_prompt(tokenizer, tokens: int) -> str:
    """The shared prefix: the policy text repeated to exactly `tokens` tokens."""
    ids = tokenizer(SYSTEM * (tokens // 20 + 2))["input_ids"][:tokens]
    return tokenizer.decode(ids)


def workload(tokenizer, prefix_tokens: int, n: int, base_name: str, with_base: bool) -> list[tuple[str, str]]:
    prefix = system_prompt(tokenizer, prefix_tokens)
    models = ADAPTERS + ([base_name] if with_base else [])
    return [(models[i % len(models)], f"{prefix}\nQuestion {i}: which boots suit a wet {i}-day trek?\nAnswer:")
            for i in range(n)]


def run(settings: Settings, args) -> dict:
    engine = start_engine(settings)
    new_tokens = args.new_tokens
    work = workload(engine.tokenizer, args.prefix_tokens, args.requests, engine.base_name, args.base)
    try:
        # Warm-up on an unrelated prompt: adapters into their slots, first-step costs paid, nothing shared.
        for i, model in enumerate(dict.fromkeys(m for m, _ in work)):
            asyncio.run(stream_one(engine, request(f"w{i}", model, f"Warm-up {i}: hello there.", 2)))
        engine.prefix_cache.queried_tokens = engine.prefix_cache.hit_tokens = 0
        engine.core.prefill_tokens = 0
        serial = []
        start = time.perf_counter()
        for i, (model, prompt) in enumerate(work):
            serial.append(asyncio.run(stream_one(engine, request(f"s{i}", model, prompt, new_tokens))))
        serial_wall = time.perf_counter() - start
        stats = engine.stats()
        burst_wall, burst = asyncio.run(run_burst(engine, [(p, new_tokens) for _, p in work],
                                                  [m for m, _ in work], "b"))
        after = engine.stats()
    finally:
        engine.stop()
    tokens = new_tokens * len(work)
    return {
        "serial": {**latency_summary(serial), "seconds": serial_wall, "output_tok_s": tokens / serial_wall,
                   "prefill_tokens": stats.prefill_tokens,
                   "hit_ratio": stats.prefix_cache_hit_tokens / max(1, stats.prefix_cache_queried_tokens)},
        "burst": {**latency_summary(burst), "seconds": burst_wall, "output_tok_s": tokens / burst_wall,
                  "prefill_tokens": after.prefill_tokens - stats.prefill_tokens,
                  "hit_ratio": (after.prefix_cache_hit_tokens - stats.prefix_cache_hit_tokens)
                  / max(1, after.prefix_cache_queried_tokens - stats.prefix_cache_queried_tokens)},
    }


def table(results: dict, args) -> str:
    lines = [f"Shared prefix {args.prefix_tokens} tokens, {args.requests} requests over {len(ADAPTERS)} shipped "
             f"adapters{' and the base' if args.base else ''}, {args.new_tokens} new tokens each, greedy; "
             f"niceness {os.nice(0)}, {args.threads or 'default'} engine threads, {os.cpu_count()} CPUs, load average "
             f"{os.getloadavg()[0]:.1f} at the end (a shared machine: other jobs ran meanwhile).", "",
             "| pass | prefix cache | TTFT p50 ms | TTFT mean ms | output tok/s | seconds | prompt tokens computed "
             "| hit ratio |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for form in ("serial", "burst"):
        for setting in ("off", "on"):
            r = results[setting][form]
            lines.append(f"| {'one at a time' if form == 'serial' else 'all at once'} | {setting} | "
                         f"{r['ttft_p50_ms']:.0f} | {r['ttft_mean_ms']:.0f} | {r['output_tok_s']:.1f} | "
                         f"{r['seconds']:.1f} | {r['prefill_tokens']} | {r['hit_ratio']:.2f} |")
    lines.append("")
    for form in ("serial", "burst"):
        off, on = results["off"][form], results["on"][form]
        lines.append(f"- {form}: TTFT p50 {off['ttft_p50_ms'] / on['ttft_p50_ms']:.2f}x lower, throughput "
                     f"{on['output_tok_s'] / off['output_tok_s']:.2f}x with the cache on")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix-tokens", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--base", action="store_true", help="the base model takes part in the rotation too")
    parser.add_argument("--threads", type=int, default=None, help="engine torch threads (unset: torch's default)")
    args = parser.parse_args()
    results = {}
    for setting in ("off", "on"):
        settings = Settings(prefix_cache=setting == "on", adapters_dir=ROOT / "adapters", threads=args.threads)
        results[setting] = run(settings, args)
        print(setting, results[setting], flush=True)
    text = table(results, args)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prefix-cache.md").write_text("# Prefix cache\n\n`nice -n 19 .venv/bin/python bench/prefix_cache.py`"
                                             "\n\n" + text)
    write_json("prefix-cache.json", {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
