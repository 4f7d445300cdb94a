"""Helpers shared by the benchmarks: workloads, cheap adapters, engine runs with per-token timing,
this machine's read bandwidth and the bytes of an adapter.

Imported by the scripts in bench/; no benchmark logic here.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from server.adapters.layout import BaseLayout  # noqa: E402
from server.adapters.names import CONFIG_FILE, WEIGHTS_FILE  # noqa: E402
from server.config import Settings  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.request import GenerationRequest, SamplingParams  # noqa: E402
from server.models import load_base_model  # noqa: E402
# The engine's step thread must be the only long-lived thread that owns torch worker threads
# (server/threads.py says why), so the benchmarks run their own torch work (loading, peers,
# writing adapters) in threads that end, and keep the main thread free of it.
from server.threads import run_in_fresh_thread as in_thread  # noqa: E402

RESULTS = ROOT / "bench" / "results"
Workload = list[tuple[str, int]]  # (prompt text, max_tokens)

# Target sets of the cheap adapters (suffixes of the base's linear modules).
TARGET_SETS: dict[str, tuple[str, ...]] = {
    "qv": ("q_proj", "v_proj"),
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def make_workload(tokenizer, n: int, prompt_range: tuple[int, int], new_range: tuple[int, int], seed: int,
                  equal: bool = False) -> Workload:
    """`n` prompts of exactly the drawn token length; `equal` gives every request the upper lengths."""
    rng = random.Random(seed)
    words = [w for w in (tokenizer.decode([i]) for i in range(1000, 20000)) if w.strip().isalpha()]
    work = []
    for _ in range(n):
        length = prompt_range[1] if equal else rng.randint(*prompt_range)
        text = "".join(rng.choice(words) for _ in range(length))
        ids = tokenizer(text)["input_ids"][:length]
        work.append((tokenizer.decode(ids), new_range[1] if equal else rng.randint(*new_range)))
    return work


def write_random_adapter(folder: Path, layout: BaseLayout, rank: int, targets: tuple[str, ...], seed: int,
                         dtype: torch.dtype = torch.float32, pool: torch.Tensor | None = None) -> int:
    """Write a PEFT LoRA folder (config + safetensors) without building a PEFT model; returns its file bytes.

    A [r, in] ~ N(0, 1/in), B [out, r] ~ N(0, 0.01^2): outputs stay near the base model's. With `pool`
    (a large 1-D N(0, 1) tensor) each matrix is a slice of it at a seeded offset: a thousand adapters
    then cost disk writes, not random numbers.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(rows: int, cols: int) -> torch.Tensor:
        if pool is None:
            return torch.randn(rows, cols, generator=gen)
        start = int(torch.randint(0, pool.numel() - rows * cols, (1,), generator=gen))
        return pool[start: start + rows * cols].view(rows, cols)

    tensors = {}
    for name, (fan_in, fan_out) in layout.linear.items():
        if name.rpartition(".")[2] not in targets:
            continue
        tensors[f"base_model.model.{name}.lora_A.weight"] = (normal(rank, fan_in) / fan_in ** 0.5).to(dtype)
        tensors[f"base_model.model.{name}.lora_B.weight"] = (normal(fan_out, rank) * 0.01).to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": list(targets), "bias": "none", "lora_dropout": 0.0}
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    save_file(tensors, str(folder / WEIGHTS_FILE))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def lora_bytes(layout: BaseLayout, rank: int, targets: tuple[str, ...] | None = None, elem: int = 4) -> int:
    """Bytes of one adapter's A and B on `targets` (None = every linear): what a step reads for it."""
    return sum(rank * (fan_in + fan_out) * elem for name, (fan_in, fan_out) in layout.linear.items()
               if targets is None or name.rpartition(".")[2] in targets)


def read_bandwidth(mbytes: int = 512, repeats: int = 5) -> float:
    """This machine's read bandwidth in bytes/s: the best of `repeats` sums over one large tensor."""
    src = torch.ones(mbytes * 2**20 // 4)
    src.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - start)
    return src.numel() * 4 / best


def forward_flops(model, layout: BaseLayout, tokenizer, work: Workload) -> float:
    """Multiply-add FLOPs of serving `work` on `model` with no waste: every linear layer for each token
    fed (prompt, then each new token but the last), the LM head once per new token, and attention's
    QK^T and AV over each token's context."""
    config = model.config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    linear = sum(fan_in * fan_out for fan_in, fan_out in layout.linear.values())
    flops = 0.0
    for prompt, new in work:
        fed = len(tokenizer(prompt)["input_ids"]) + new - 1
        flops += 2 * linear * fed + 2 * config.vocab_size * hidden * new + 2 * hidden * layers * fed * (fed + 1)
    return flops


def matmul_rate(model, layout: BaseLayout, rows: int, repeats: int = 5) -> float:
    """FLOP/s of float32 `F.linear` over the model's linear shapes and LM head at `rows` rows, each
    weighted by how often a forward runs it: the best of `repeats` (the arithmetic ceiling of a step)."""
    config = model.config
    shapes = Counter(layout.linear.values())
    shapes[(config.hidden_size, config.vocab_size)] += 1
    mats = {shape: (torch.randn(rows, shape[0]), torch.randn(shape[1], shape[0])) for shape in shapes}
    flops = sum(2 * rows * i * o * n for (i, o), n in shapes.items())
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for shape, count in shapes.items():
            x, w = mats[shape]
            for _ in range(count):
                torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - start)
    return flops / best


@dataclass
class RequestTiming:
    """Wall times of one streamed request: submit, first token, and each later token."""

    submitted: float
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.submitted

    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


async def stream_one(engine: Engine, request: GenerationRequest, delay: float = 0.0) -> RequestTiming:
    """Submit after `delay` seconds and record when each generated token arrives (deltas may carry several)."""
    if delay:
        await asyncio.sleep(delay)
    timing = RequestTiming(time.perf_counter())
    (stream,) = await engine.submit(request)
    seen = 0
    async for delta in stream:
        now = time.perf_counter()
        timing.token_times.extend([now] * (delta.completion_tokens - seen))
        seen = delta.completion_tokens
    assert seen == request.params.max_tokens, (seen, request.params.max_tokens)
    return timing


def request(rid: str, model: str, prompt: str, new: int) -> GenerationRequest:
    return GenerationRequest(rid, model, prompt, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))


def start_engine(settings: Settings) -> Engine:
    """A started engine; built in a thread that ends, so its step thread is the only one with torch workers."""
    def build() -> Engine:
        engine = Engine(load_base_model(settings), settings)
        engine.load_store()
        return engine

    engine = in_thread(build)
    engine.start()
    return engine


async def run_burst(engine: Engine, work: Workload, models: list[str], tag: str,
                    delays: list[float] | None = None) -> tuple[float, list[RequestTiming]]:
    """All requests of `work` (request i on models[i]), each after its delay; returns wall time and timings."""
    delays = delays or [0.0] * len(work)
    start = time.perf_counter()
    timings = await asyncio.gather(*(stream_one(engine, request(f"{tag}-{i}", models[i], p, n), delays[i])
                                     for i, (p, n) in enumerate(work)))
    return time.perf_counter() - start, list(timings)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def latency_summary(timings: list[RequestTiming]) -> dict[str, float]:
    """TTFT and ITL p50/p99 in milliseconds."""
    ttft = [t.ttft for t in timings]
    itl = [x for t in timings for x in t.itls()]
    return {"ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
            "itl_p50_ms": 1e3 * percentile(itl, 50), "itl_p99_ms": 1e3 * percentile(itl, 99),
            "ttft_mean_ms": 1e3 * statistics.fmean(ttft)}


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
