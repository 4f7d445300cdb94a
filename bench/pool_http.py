"""Many mixed-rank adapters over HTTP, as a new user would run them: a `loraplex serve` process, a store of
`--adapters` adapters (ranks cycling over `--ranks`, target sets over q/v, attention, MLP, all-linear),
`--requests` completions sent at once with adapters drawn Zipf(s), against the same requests all on one
adapter of the same server; the runs alternate (one, Zipf, one, Zipf, ...), the fastest of each counts.

    python bench/pool_http.py                       # 120 adapters, 96 requests, default settings
    python bench/pool_http.py --pool-slots 8        # the pool sized to what 8 padded rank-16 slots take

Writes bench/results/pool-http[-pool<N>].md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, in_thread, make_workload, write_json  # noqa: E402
from bench.scaling import PADDED_RANK, draw, write_adapters  # noqa: E402
from server.adapters.layout import BaseLayout  # noqa: E402
from server.config import Settings  # noqa: E402
from server.lora.model import padded_slot_bytes  # noqa: E402
from server.models import load_base_model  # noqa: E402
from tests.e2e.server_process import running_server  # noqa: E402


async def burst(url: str, work: list[tuple[str, int]], models: list[str]) -> float:
    """Output tokens per second of every request sent at once."""
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=512)) as client:
        async def one(prompt: str, new: int, model: str) -> int:
            response = await client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": new,
                                                                   "temperature": 0, "ignore_eos": True})
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        counts = await asyncio.gather(*(one(p, n, m) for (p, n), m in zip(work, models)))
        return sum(counts) / (time.perf_counter() - start)


def scrape(url: str, prefix: str = "loraplex_adapter_pool_") -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {line.split()[0].removeprefix(prefix): float(line.split()[1]) for line in text.splitlines()
            if line.startswith(prefix)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=120)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--ranks", type=int, nargs="*", default=[4, 8, 16])
    parser.add_argument("--pool-slots", type=int, default=None, help="pool = what this many padded rank-16 slots take")
    parser.add_argument("--zipf-s", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, nargs=2, default=[16, 64])
    parser.add_argument("--extra", nargs="*", default=[], help="more `loraplex serve` flags")
    parser.add_argument("--cache-dir", type=Path, default=Settings().cache_dir)
    args = parser.parse_args()
    settings = Settings(cache_dir=args.cache_dir, device="cpu")
    base = in_thread(load_base_model, settings)
    layout = BaseLayout.from_model(base.model)
    work = make_workload(base.tokenizer, args.requests, (16, 64), tuple(args.new_tokens), 0)
    flags = ["--max-lora-rank", str(max(args.ranks)), "--no-prefix-cache", *args.extra]
    if args.pool_slots:
        pool_bytes = args.pool_slots * padded_slot_bytes(layout, PADDED_RANK, torch.float32)
        flags += ["--lora-pool-gb", f"{pool_bytes / 2**30:.6f}"]
    with tempfile.TemporaryDirectory() as tmp:
        names = in_thread(write_adapters, Path(tmp), layout, args.adapters, tuple(args.ranks))
        with running_server("--adapters-dir", str(Path(tmp) / "all"), *flags, timeout=900) as url:
            asyncio.run(burst(url, work[:2], [names[0]] * 2))  # warm-up
            one, zipf, distinct = [], [], []
            for round_ in range(args.repeats):
                one.append(asyncio.run(burst(url, work, [names[0]] * len(work))))
                models = draw(names, len(work), "zipf", args.zipf_s, round_)
                distinct.append(len(set(models)))
                zipf.append(asyncio.run(burst(url, work, models)))
                print(f"round {round_}: one {one[-1]:.1f}, zipf {zipf[-1]:.1f} tok/s", file=sys.stderr, flush=True)
            one.append(asyncio.run(burst(url, work, [names[0]] * len(work))))
            pool = scrape(url)
    result = {"one_tok_s": one, "zipf_tok_s": zipf, "distinct": distinct, "ratio": max(zipf) / max(one), "pool": pool,
              "flags": flags, "adapters": args.adapters, "requests": args.requests, "ranks": args.ranks,
              "threads": torch.get_num_threads()}
    text = render(result)
    print(text)
    suffix = f"-pool{args.pool_slots}" if args.pool_slots else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"pool-http{suffix}.md").write_text(text)
    write_json(f"pool-http{suffix}.json", result)


def render(r: dict) -> str:
    pool = r["pool"]
    return "\n".join([
        f"# {r['adapters']} adapters of ranks {'/'.join(map(str, r['ranks']))} over HTTP, {r['requests']} requests "
        f"at once, Zipf (CPU, {r['threads']} threads)\n",
        f"`loraplex serve {' '.join(r['flags'])}`; {r['distinct']} distinct adapters per Zipf run.\n",
        "| run | tok/s (each round) | fastest |", "| --- | --- | ---: |",
        f"| one adapter | {', '.join(f'{t:.1f}' for t in r['one_tok_s'])} | {max(r['one_tok_s']):.1f} |",
        f"| Zipf draw | {', '.join(f'{t:.1f}' for t in r['zipf_tok_s'])} | {max(r['zipf_tok_s']):.1f} |",
        f"\nRatio (fastest Zipf / fastest one adapter): **{r['ratio']:.2f}** (target >= 0.85).\n",
        f"Pool: {pool.get('bytes', 0) / 2**20:.0f} MiB, {pool.get('adapters', 0):.0f} adapters resident at the end, "
        f"{pool.get('evictions_total', 0):.0f} evictions, {pool.get('admissions_delayed_total', 0):.0f} admissions "
        f"delayed, {pool.get('compactions_total', 0):.0f} compactions.\n"])


if __name__ == "__main__":
    main()
