"""Scale-out: throughput with 1 and 2 engine replicas behind the Ray Serve ingress, and adapter affinity.

    python bench/cluster.py            # 1 and 2 replicas, 96 requests over 16 adapters each
    python bench/cluster.py --quick    # 32 requests: a smoke run

Both runs serve the same workload through `loraplex serve-cluster` on this machine (the embedded
model, fp32): 16 adapters (the four shipped ones, each under four names: 16 distinct adapters to
the router and the engines), requests drawn uniformly with a fixed seed, 16 in flight, 32 new
tokens each (EOS ignored), non-streamed, over the real HTTP ingress. One replica gets every
core (`--replica-cpus` = cores); two replicas get half each. Two more rows run the same workload
on one plain `loraplex serve` (no Ray) and on one replica with a single torch thread.

`--background-load N` runs N busy-looping processes at normal priority during each run, to see
what a machine shared with other work does to each setup (OpenMP teams wait for their slowest
thread at every op; a thread the kernel has descheduled holds the whole team).

Affinity: a request counts as routed to a replica already holding its adapter when that replica
(its `x-loraplex-replica` header) served the same adapter before in the run; measured in steady
state, after each adapter's first request. Runs itself inside a loopback-only network namespace
(server/deploy/netns.py). Writes bench/results/cluster.md and cluster.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.deploy.netns import loopback_only, namespaced  # noqa: E402
from tests.cluster.cluster_process import SMALL, cluster_process  # noqa: E402
from tests.e2e.server_process import running_server  # noqa: E402

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
            # Weights only: a contract's template, defaults and schema would change the workload per adapter.
            shutil.copytree(ROOT / "adapters" / shipped, folder / name, ignore=shutil.ignore_patterns("loraplex.json"))
            names.append(name)
    return names


def run_one(url: str, model: str, prompt: str, tokens: int) -> tuple[str, str, int]:
    response = httpx.post(f"{url}/v1/completions", timeout=600,
                          json={"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
                                "ignore_eos": True})
    response.raise_for_status()
    return model, response.headers.get("x-loraplex-replica", "single"), response.json()["usage"]["completion_tokens"]


def busy_loop() -> None:
    while True:
        pass


class BackgroundLoad:
    """`n` processes spinning on a core each at normal priority, while the block runs."""

    def __init__(self, n: int) -> None:
        self.procs = [multiprocessing.Process(target=busy_loop, daemon=True) for _ in range(n)]

    def __enter__(self) -> BackgroundLoad:
        for proc in self.procs:
            proc.start()
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.kill()
            proc.join()


@contextmanager
def server_url(setup: dict, store: Path):
    """Start `setup`'s server (a cluster, or one plain server: 0 replicas); yields its URL."""
    flags = ("--adapters-dir", str(store), "--max-running", "16", "--max-queue", "32", "--max-loras", "8",
             "--max-cpu-loras", "16", *(("--threads", str(setup["threads"])) if setup.get("threads") else ()))
    if setup["replicas"] == 0:
        with running_server(*SMALL, *flags) as url:
            yield url
    else:
        with cluster_process(*flags, replicas=setup["replicas"], extra=("--replica-cpus", str(setup["cpus"]))) as (_, url):
            yield url


def measure(setup: dict, names: list[str], store: Path, args: argparse.Namespace) -> dict:
    rng = random.Random(0)
    work = [(rng.choice(names), rng.choice(PROMPTS)) for _ in range(args.requests)]
    with server_url(setup, store) as url:
        run_one(url, names[0], PROMPTS[0], 2)  # warm: the ingress learns the base model's name
        with BackgroundLoad(args.background_load):
            started = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                done = list(pool.map(lambda w: run_one(url, w[0], w[1], args.tokens), work))
            seconds = time.perf_counter() - started
            load = os.getloadavg()[0]
    served: dict[str, set[str]] = {}
    hits = steady = 0
    for model, replica, _ in done:
        if model in served:
            steady += 1
            hits += replica in served[model]
        served.setdefault(model, set()).add(replica)
    output = sum(t for _, _, t in done)
    return {**setup, "requests": args.requests, "seconds": round(seconds, 2), "load_1min": round(load, 1),
            "output_tokens": output, "output_tok_s": round(output / seconds, 1),
            "replicas_used": len({r for _, r, _ in done}), "steady_requests": steady,
            "affinity": round(hits / steady, 4) if steady else None,
            "replicas_per_adapter": round(sum(len(v) for v in served.values()) / len(served), 2)}


# Each setup's "cpus" (per replica) is the machine's cores shared out over its replicas.
SETUPS = ({"label": "plain `loraplex serve`, no Ray", "replicas": 0},
          {"label": "1 replica", "replicas": 1},
          {"label": "1 replica, `--threads 1`", "replicas": 1, "threads": 1},
          {"label": "2 replicas", "replicas": 2})


def report(rows: list[dict], args: argparse.Namespace) -> str:
    load = (f"with {args.background_load} busy-looping processes at normal priority beside it"
            if args.background_load else "with nothing else running")
    lines = [f"Measured on this {os.cpu_count()}-core CPU machine {load} (1-minute load average at the end of "
             f"each run in the table), {args.requests} requests over 16 adapters, {args.concurrency} in flight, "
             f"{args.tokens} new tokens each, greedy, EOS ignored (`python bench/cluster.py"
             f"{f' --background-load {args.background_load}' if args.background_load else ''}`).", "",
             "| setup | CPUs each | output tok/s | seconds | ratio to plain serve | routed to a holder (steady) | "
             "replicas per adapter | load |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    first = rows[0]["output_tok_s"]
    for row in rows:
        affinity = "" if row["replicas"] == 0 else f"{100 * row['affinity']:.1f}%"
        spread = "" if row["replicas"] == 0 else row["replicas_per_adapter"]
        lines.append(f"| {row['label']} | {row['cpus']:g} | {row['output_tok_s']} | {row['seconds']} | "
                     f"{row['output_tok_s'] / first:.2f} | {affinity} | {spread} | {row['load_1min']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--background-load", type=int, default=0, metavar="N")
    args = parser.parse_args()
    if args.quick:
        args.requests = 32
    if not loopback_only():
        os.execvp("unshare", namespaced([sys.executable, *sys.argv]))
    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for i, setup in enumerate(SETUPS):
            setup = {**setup, "cpus": cores / max(1, setup["replicas"])}
            store = Path(tmp) / f"store-{i}"
            store.mkdir()
            rows.append(measure(setup, make_store(store), store, args))
            print(rows[-1], flush=True)
    text = report(rows, args)
    print(text)
    suffix = f"-load-{args.background_load}" if args.background_load else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"cluster{suffix}.md").write_text(text)
    (RESULTS / f"cluster{suffix}.json").write_text(json.dumps({"runs": rows, "cores": os.cpu_count(),
                                                               "settings": vars(args)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
