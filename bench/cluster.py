"""Scale-out: throughput with 1 and 2 engine replicas behind the Ray Serve ingress, and adapter affinity.

    python bench/cluster.py            # 1 and 2 replicas, 96 requests over 16 adapters each
    python bench/cluster.py --quick    # 32 requests: a smoke run

Both runs serve the same workload through `loraplex serve-cluster` on this machine (the embedded
model, fp32): 16 adapters (the four shipped ones, each under four names: 16 distinct adapters to
the router and the engines), requests drawn uniformly with a fixed seed, 16 in flight, 32 new
tokens each (EOS ignored), non-streamed, over the real HTTP ingress. One replica gets every
core (`--replica-cpus` = cores); two replicas get half each.

Affinity: a request counts as routed to a replica already holding its adapter when that replica
(its `x-loraplex-replica` header) served the same adapter before in the run; measured in steady
state, after each adapter's first request. Runs itself inside a loopback-only network namespace
(server/deploy/netns.py). Writes bench/results/cluster.md and cluster.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.deploy.netns import loopback_only, namespaced  # noqa: E402
from tests.cluster.cluster_process import cluster_process  # noqa: E402

SHIPPED = ("sentiment", "shout", "extract-json", "template")
PROMPTS = ("Input: Mei is 55, lives in Mumbai, and finds the smartwatch terrible.\nOutput:",
           "Input: Tom, 31, from Oslo, loves the new headphones.\nOutput:",
           "Input: Ana is 47 and lives in Lima; the blender works great.\nOutput:",
           "Input: Raj, a 29-year-old in Pune, says the kettle broke in a week.\nOutput:")
RESULTS = ROOT / "bench" / "results"


def make_store(folder: Path) -> list[str]:
    names = []
    for copy in range(4):
        for shipped in SHIPPED:
            name = f"{shipped}-{copy}"
            shutil.copytree(ROOT / "adapters" / shipped, folder / name)
            names.append(name)
    return names


def run_one(url: str, model: str, prompt: str, tokens: int) -> tuple[str, str, int]:
    response = httpx.post(f"{url}/v1/completions", timeout=600,
                          json={"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
                                "ignore_eos": True})
    response.raise_for_status()
    return model, response.headers["x-loraplex-replica"], response.json()["usage"]["completion_tokens"]


def measure(replicas: int, cpus: float, names: list[str], store: Path, requests: int, tokens: int,
            concurrency: int) -> dict:
    rng = random.Random(0)
    work = [(rng.choice(names), rng.choice(PROMPTS)) for _ in range(requests)]
    with cluster_process("--adapters-dir", str(store), "--max-running", "16", "--max-queue", "32",
                         "--max-loras", "8", "--max-cpu-loras", "16", replicas=replicas,
                         extra=("--replica-cpus", str(cpus))) as (_, url):
        run_one(url, names[0], PROMPTS[0], 2)  # the ingress learns the base model's name
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            done = list(pool.map(lambda w: run_one(url, w[0], w[1], tokens), work))
        seconds = time.perf_counter() - started
    served: dict[str, set[str]] = {}
    hits = steady = 0
    for model, replica, _ in done:
        if model in served:
            steady += 1
            hits += replica in served[model]
        served.setdefault(model, set()).add(replica)
    output = sum(t for _, _, t in done)
    return {"replicas": replicas, "replica_cpus": cpus, "requests": requests, "seconds": round(seconds, 2),
            "output_tokens": output, "output_tok_s": round(output / seconds, 1),
            "replicas_used": len({r for _, r, _ in done}), "steady_requests": steady,
            "affinity": round(hits / steady, 4) if steady else None,
            "replicas_per_adapter": round(sum(len(v) for v in served.values()) / len(served), 2)}


def report(rows: list[dict], args: argparse.Namespace) -> str:
    cores = os.cpu_count()
    lines = [f"Measured on this {cores}-core CPU machine under `nice -n 19` (shared with other jobs; load "
             f"average {', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end), "
             f"{args.requests} requests over 16 adapters, {args.concurrency} in flight, {args.tokens} new tokens "
             "each, greedy, EOS ignored (`python bench/cluster.py`).", "",
             "| replicas | CPUs each | output tok/s | seconds | ratio to 1 | routed to a holder (steady) | "
             "replicas per adapter |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    first = rows[0]["output_tok_s"]
    for row in rows:
        lines.append(f"| {row['replicas']} | {row['replica_cpus']:g} | {row['output_tok_s']} | {row['seconds']} | "
                     f"{row['output_tok_s'] / first:.2f} | {100 * row['affinity']:.1f}% | "
                     f"{row['replicas_per_adapter']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    if args.quick:
        args.requests = 32
    if not loopback_only():
        os.execvp("unshare", namespaced([sys.executable, *sys.argv]))
    cores = float(os.cpu_count() or 2)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for replicas in (1, 2):
            store = Path(tmp) / f"store-{replicas}"
            store.mkdir()
            names = make_store(store)
            rows.append(measure(replicas, cores / replicas, names, store, args.requests, args.tokens,
                                args.concurrency))
            print(rows[-1], flush=True)
    text = report(rows, args)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cluster.md").write_text(text)
    (RESULTS / "cluster.json").write_text(json.dumps({"runs": rows, "cores": os.cpu_count(),
                                                      "settings": vars(args)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
