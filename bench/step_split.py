"""Where the engine's steps spend their time on the 64x32-short workload, in process: prefill steps (any
prompt chunk in the step) and decode-only steps, each split between the base model's linear layers, the
LoRA op, attention and the rest (embedding, norms, rotary, output head, sampling's forward share, Python).

    python bench/step_split.py                  # base, then 32 resident adapters, then 24 of them cold
    python bench/step_split.py --requests 16 --adapters 8 --cold 6 --new-tokens 16   # a small run

The same engine serves the three bursts (base; every adapter resident; `--cold` adapters never used
before, so read, hashed, parsed and written into the pool during the burst). Timers wrap the runner's
step, the base linears inside the LoRA layers, the LoRA op and the attention function; the cold burst's
adapter loads are timed where they happen (the loader thread's parse, the engine thread's pool write).
Writes bench/results/step-split.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.burst_http import TARGETS, spread, word_prompts  # noqa: E402
from bench.common import RESULTS, in_thread, run_burst, start_engine, write_json, write_random_adapter  # noqa: E402
from server.adapters.layout import BaseLayout  # noqa: E402
from server.config import Settings  # noqa: E402
from server.models import load_base_model  # noqa: E402

PARTS = ("base linears", "LoRA op", "attention", "rest")


class Timers:
    """Seconds per (step kind, part), and the steps counted per kind."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.steps: dict[str, int] = defaultdict(int)
        self.kind = "decode"
        self.other: dict[str, float] = defaultdict(float)

    def add(self, part: str, seconds: float) -> None:
        self.seconds[(self.kind, part)] += seconds

    def reset(self) -> None:
        self.seconds.clear()
        self.steps.clear()
        self.other.clear()


def timed(timers: Timers, part: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timers.add(part, time.perf_counter() - start)
    return wrapper


def instrument(engine, timers: Timers) -> None:
    """Wrap the runner's step, every LoRA layer's base linear and op, and the attention function."""
    from transformers import AttentionInterface

    from server.engine import attention
    from server.lora.layers import LoraLinear

    core = engine.core
    runner = core.runner
    step = runner.step

    def timed_step(plan):
        timers.kind = "prefill" if any(item.seq.num_computed < item.seq.prompt_len for item in plan) else "decode"
        timers.steps[timers.kind] += 1
        start = time.perf_counter()
        try:
            return step(plan)
        finally:
            timers.add("step", time.perf_counter() - start)

    runner.step = timed_step
    AttentionInterface.register(attention.PAGED_ATTENTION, timed(timers, "attention", attention.paged_attention_forward))
    try:  # the lean decoder forward calls the attention functions itself
        from server.engine import lean_forward
    except ImportError:
        lean_forward = None
    for name in ("attend_written", "decode_kernel_into"):
        if lean_forward is not None and hasattr(lean_forward, name):
            setattr(lean_forward, name, timed(timers, "attention", getattr(lean_forward, name)))
    for module in runner.lora.model.modules():
        if isinstance(module, LoraLinear):
            module.base.forward = timed(timers, "base linears", module.base.forward)
            module.add_lora = timed(timers, "LoRA op", module.add_lora)
    manager = core.manager
    manager._write = timed_other(timers, "pool writes (engine thread)", manager._write)
    loader = getattr(manager.registry, "loader", None)  # the background reads (server/adapters/loader.py)
    if loader is not None and hasattr(loader, "_run"):
        loader._run = timed_other(timers, "read, hash and parse (loader thread)", loader._run)


def timed_other(timers: Timers, name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timers.other[name] += time.perf_counter() - start
    return wrapper


def split(timers: Timers, wall: float) -> dict:
    out: dict = {"wall_s": wall, "other": dict(timers.other)}
    for kind in ("prefill", "decode"):
        total = timers.seconds.get((kind, "step"), 0.0)
        parts = {p: timers.seconds.get((kind, p), 0.0) for p in PARTS[:3]}
        parts["rest"] = total - sum(parts.values())
        out[kind] = {"steps": timers.steps.get(kind, 0), "seconds": total, **parts}
    return out


def render(results: dict, args: argparse.Namespace) -> str:
    lines = [f"# Engine steps on {args.requests}x{args.adapters}-short, in process (CPU)\n",
             f"Prompts of {args.words[0]}-{args.words[1]} words, {args.new_tokens} new tokens; cold: {args.cold} "
             f"adapters never used before the burst. Seconds summed over the burst's steps; the engine's LoRA "
             f"layers' base linears (the output head is in 'rest').\n",
             "| burst | wall s | step kind | steps | step s | base linears | LoRA op | attention | rest |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        for kind in ("prefill", "decode"):
            k = r[kind]
            lines.append(f"| {name} | {r['wall_s']:.1f} | {kind} | {k['steps']} | {k['seconds']:.2f} | "
                         + " | ".join(f"{k[p]:.2f}" for p in PARTS) + " |")
    for name, r in results.items():
        if r["other"]:
            lines.append(f"\n{name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["other"].items()))
    return "\n".join(lines) + "\n"


async def bursts(engine, prompts, hot, cold, args, timers: Timers) -> dict:
    await run_burst(engine, [(p, 1) for p in prompts[:len(hot)]], hot, "warm")
    work = [(p, args.new_tokens) for p in prompts]
    results = {}
    runs = [("base", [args.base] * len(work)), ("resident", spread(hot, len(work))),
            ("cold", spread(hot[:len(hot) - len(cold)] + cold, len(work)))]
    for name, models in runs:
        timers.reset()
        wall, _ = await run_burst(engine, work, models, name)
        results[name] = split(timers, wall)
        print(f"{name}: {wall:.1f} s", file=sys.stderr, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--cold", type=int, default=24)
    parser.add_argument("--words", type=int, nargs=2, default=[10, 130])
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(device="cpu", adapters_dir=Path(tmp), prefix_cache=False)
        base = in_thread(load_base_model, settings)
        layout = BaseLayout.from_model(base.model)
        names = [f"a{i:03d}" for i in range(args.adapters + args.cold)]
        in_thread(lambda: [write_random_adapter(Path(tmp) / n, layout, 16, TARGETS, seed=i)
                           for i, n in enumerate(names)])
        prompts = word_prompts(base.tokenizer, args.requests, tuple(args.words), seed=0)
        del base
        engine = start_engine(settings)
        args.base = engine.base_name
        timers = Timers()
        instrument(engine, timers)
        results = asyncio.run(bursts(engine, prompts, names[:args.adapters], names[args.adapters:], args, timers))
        engine.stop()
    text = render(results, args)
    print(text)
    (RESULTS / "step-split.md").write_text(text)
    write_json("step-split.json", {"results": results, "requests": args.requests, "adapters": args.adapters,
                                   "cold": args.cold, "words": args.words, "new_tokens": args.new_tokens})


if __name__ == "__main__":
    main()
