"""The 64x32-short workload over HTTP: many adapters' short prompts arriving at once, as a new user sends them.

A `loraplex serve` process on a store of rank-16 all-linear adapters; `--requests` completions sent at once,
prompts of `--words` words (10-130), `--new-tokens` new tokens each (64), greedy, EOS ignored. Three kinds
of run, alternated in one server (base, resident, cold, cold, resident, base; `--repeats` rounds, the
fastest of each kind counts):

  base      every request on the base model
  resident  the requests spread over `--adapters` adapters (32), every one already in the adapter pool
  cold      the same spread, but `--cold` of the adapters (24) were never used on this server: each is read
            from the store (the page cache, since the benchmark has just written it), hashed, parsed and
            written into the pool during the burst; the others are resident. Every cold run has a fresh set.

    python bench/burst_http.py                       # 64 requests over 32 adapters, 2 rounds
    python bench/burst_http.py --quick               # 16 requests over 8 adapters, 1 round (a smoke run)
    python bench/burst_http.py --profile DIR         # py-spy profiles of one resident and one cold run

Writes bench/results/burst-http[-TAG].md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, in_thread, write_json, write_random_adapter  # noqa: E402
from bench.pool_http import scrape  # noqa: E402
from server.adapters.layout import BaseLayout  # noqa: E402
from server.config import Settings  # noqa: E402
from server.models import load_base_model  # noqa: E402
from tests.e2e.server_process import server_process  # noqa: E402

BASE = "base"  # the served base model's name (--served-model-name)
KINDS = ("base", "resident", "cold")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def word_prompts(tokenizer, n: int, words: tuple[int, int], seed: int) -> list[str]:
    """`n` prompts of a drawn number of words, each word a whole alphabetic token of the vocabulary."""
    rng = random.Random(seed)
    vocab = [w.strip() for w in (tokenizer.decode([i]) for i in range(1000, 20000)) if w.strip().isalpha()]
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(*words))) for _ in range(n)]


def spread(names: list[str], n: int) -> list[str]:
    """Request i's adapter: the names round-robin, so each gets n / len(names) requests."""
    return [names[i % len(names)] for i in range(n)]


async def burst(url: str, prompts: list[str], models: list[str], new: int) -> dict:
    """Every request at once, streamed; output tokens per second, wall seconds and TTFT percentiles."""
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=512)) as client:
        async def one(prompt: str, model: str) -> tuple[int, float]:
            start = time.perf_counter()
            body = {"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
                    "apply_template": False, "stream": True, "stream_options": {"include_usage": True}}
            first, tokens = None, 0
            async with client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    first = first or time.perf_counter() - start
                    usage = json.loads(line[6:]).get("usage")
                    tokens = usage["completion_tokens"] if usage else tokens
            return tokens, first or 0.0

        start = time.perf_counter()
        done = await asyncio.gather(*(one(p, m) for p, m in zip(prompts, models)))
        seconds = time.perf_counter() - start
    tokens = sum(t for t, _ in done)
    assert tokens == new * len(prompts), (tokens, new * len(prompts))
    ttft = sorted(f for _, f in done)
    return {"tok_s": tokens / seconds, "seconds": seconds, "ttft_p50_ms": 1e3 * ttft[len(ttft) // 2],
            "ttft_max_ms": 1e3 * ttft[-1]}


def write_store(root: Path, layout: BaseLayout, count: int, rank: int) -> list[str]:
    names = []
    for i in range(count):
        names.append(f"a{i:03d}")
        write_random_adapter(root / names[-1], layout, rank, TARGETS, seed=i)
    return names


class Profiler:
    """py-spy over the server process during one run of each adapter kind (--profile DIR)."""

    def __init__(self, folder: Path | None, pid: int) -> None:
        self.folder, self.pid, self.done = folder, pid, set()
        self.proc: subprocess.Popen | None = None

    def start(self, kind: str) -> None:
        if self.folder is None or kind == "base" or kind in self.done:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        spy = Path(sys.executable).with_name("py-spy")
        self.proc = subprocess.Popen([str(spy), "record", "--pid", str(self.pid), "--rate", "50", "--native",
                                      "--format", "raw", "-o", str(self.folder / f"{kind}.txt")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.done.add(kind)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(2)  # SIGINT: py-spy writes its file and exits
            self.proc.wait(timeout=60)
            self.proc = None


def run(args: argparse.Namespace) -> dict:
    settings = Settings(cache_dir=args.cache_dir, device="cpu")
    base = in_thread(load_base_model, settings)
    layout = BaseLayout.from_model(base.model)
    prompts = word_prompts(base.tokenizer, args.requests, tuple(args.words), seed=0)
    flags = ["--served-model-name", BASE, "--no-prefix-cache", *args.extra.split()]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    order = [k for r in range(args.repeats) for k in (KINDS if r % 2 == 0 else tuple(reversed(KINDS)))]
    cold_sets = order.count("cold")
    with tempfile.TemporaryDirectory() as tmp:
        names = in_thread(write_store, Path(tmp), layout, args.adapters + cold_sets * args.cold, args.rank)
        hot, fresh = names[:args.adapters], names[args.adapters:]
        with server_process("--adapters-dir", tmp, *flags, timeout=900) as (proc, url, _):
            profiler = Profiler(args.profile, proc.pid)
            asyncio.run(burst(url, prompts[:len(hot)], hot, 1))  # every hot adapter resident
            asyncio.run(burst(url, prompts[:2], [BASE] * 2, 1))
            for kind in order:
                if kind == "cold":
                    cold, fresh = fresh[:args.cold], fresh[args.cold:]
                    models = spread(hot[:args.adapters - args.cold] + cold, args.requests)
                else:
                    models = spread(hot, args.requests) if kind == "resident" else [BASE] * args.requests
                profiler.start(kind)
                result = asyncio.run(burst(url, prompts, models, args.new_tokens))
                profiler.stop()
                runs[kind].append(result)
                print(f"{kind}: {result['tok_s']:.1f} tok/s ({result['seconds']:.1f} s)", file=sys.stderr, flush=True)
            pool = scrape(url)
    best = {kind: max(r["tok_s"] for r in runs[kind]) for kind in KINDS}
    return {"runs": runs, "order": order, "best": best, "pool": pool, "flags": flags, "requests": args.requests,
            "adapters": args.adapters, "cold": args.cold, "rank": args.rank, "words": args.words,
            "new_tokens": args.new_tokens, "threads": args.threads or torch.get_num_threads(),
            "ratios": {"resident": best["resident"] / best["base"], "cold": best["cold"] / best["base"]}}


def render(r: dict) -> str:
    lines = [f"# {r['requests']}x{r['adapters']}-short over HTTP: {r['requests']} requests at once over "
             f"{r['adapters']} rank-{r['rank']} all-linear adapters (CPU, the server on {r['threads']} threads)\n",
             f"Prompts of {r['words'][0]}-{r['words'][1]} words, {r['new_tokens']} new tokens, greedy; "
             f"`loraplex serve {' '.join(r['flags'])}`; runs in the order {', '.join(r['order'])}; cold: "
             f"{r['cold']} of the {r['adapters']} adapters never used before the run.\n",
             "| run | tok/s (each) | fastest | vs base | TTFT p50 ms (fastest run) | target |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    targets = {"base": "", "resident": ">= 0.95", "cold": ">= 0.90"}
    for kind in KINDS:
        runs = r["runs"][kind]
        fastest = max(runs, key=lambda x: x["tok_s"])
        each = ", ".join(f"{x['tok_s']:.1f}" for x in runs)
        lines.append(f"| {kind} | {each} | {fastest['tok_s']:.1f} | "
                     f"{fastest['tok_s'] / r['best']['base']:.2f} | {fastest['ttft_p50_ms']:.0f} | {targets[kind]} |")
    pool = r["pool"]
    lines.append(f"\nPool at the end: {pool.get('adapters', 0):.0f} adapters resident, "
                 f"{pool.get('evictions_total', 0):.0f} evictions, {pool.get('admissions_delayed_total', 0):.0f} "
                 f"admissions delayed.\n")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--cold", type=int, default=24, help="adapters of a cold run never used before it")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--words", type=int, nargs=2, default=[10, 130])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of (base, resident, cold), alternated")
    parser.add_argument("--threads", type=int, default=None, help="the server's --threads (unset: its default)")
    parser.add_argument("--extra", default="", help="more `loraplex serve` flags, one string: --extra='--lora-dtype bfloat16'")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy raw profiles of a resident and a cold run")
    parser.add_argument("--tag", default="", help="results file bench/results/burst-http-TAG.md (a variant's run)")
    parser.add_argument("--quick", action="store_true", help="16 requests over 8 adapters (6 cold), 16 new tokens")
    parser.add_argument("--cache-dir", type=Path, default=Settings().cache_dir)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.adapters, args.cold, args.new_tokens, args.repeats = 16, 8, 6, 16, 1
    result = run(args)
    text = render(result)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "".join(f"-{part}" for part in (args.tag, "quick" if args.quick else "") if part)
    (RESULTS / f"burst-http{suffix}.md").write_text(text)
    write_json(f"burst-http{suffix}.json", result)


if __name__ == "__main__":
    main()
