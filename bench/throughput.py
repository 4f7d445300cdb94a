"""Throughput of one workload through four systems, side by side in one process and one run.

    python bench/throughput.py            # 32 requests, prompts 16-256 tokens, 16-256 new tokens
    python bench/throughput.py --requests 64 --adapters 32
    python bench/throughput.py --quick    # 16 requests, shorter: a smoke run

Systems: the loraplex engine with every request on the base model; the engine with the
requests spread over N distinct rank-16 all-linear adapters; transformers `generate` on the
base model in static batches; PEFT mixed-adapter `generate(adapter_names=...)` in static
batches. Every request generates exactly its `max_tokens` (EOS ignored everywhere), greedy.
Output tokens per second = requested new tokens / wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.config import Settings  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.request import GenerationRequest, SamplingParams  # noqa: E402
from server.models import load_base_model  # noqa: E402

Workload = list[tuple[str, int]]  # (prompt text, max_tokens)


def make_workload(tokenizer, n: int, prompt_range: tuple[int, int], new_range: tuple[int, int], seed: int) -> Workload:
    rng = random.Random(seed)
    words = [w for w in (tokenizer.decode([i]) for i in range(1000, 20000)) if w.strip().isalpha()]
    work = []
    for _ in range(n):
        length = rng.randint(*prompt_range)
        text = "".join(rng.choice(words) for _ in range(length))
        ids = tokenizer(text)["input_ids"][:length]  # exactly `length` tokens
        work.append((tokenizer.decode(ids), rng.randint(*new_range)))
    return work


def make_adapters(base, folder: Path, count: int) -> list[str]:
    from peft import LoraConfig, get_peft_model

    names = []
    for i in range(count):
        torch.manual_seed(i)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                               init_lora_weights=False))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(0.05)
        model.save_pretrained(folder / f"bench-{i}")
        names.append(f"bench-{i}")
    return names


def run_engine(settings: Settings, work: Workload, models: list[str]) -> float:
    engine = Engine(load_base_model(settings), settings)
    engine.load_store()
    engine.start()

    async def burst(items: Workload) -> None:
        requests = [GenerationRequest(f"r{i}-{len(items)}", models[i % len(models)], prompt,
                                      SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
                    for i, (prompt, new) in enumerate(items)]
        results = await asyncio.gather(*(engine.generate(r) for r in requests))
        assert [r.completion_tokens for r in results] == [new for _, new in items]

    try:
        asyncio.run(burst(work[:2]))  # warm-up: first-touch of the slot buffers and KV cache pages
        start = time.perf_counter()
        asyncio.run(burst(work))
        return time.perf_counter() - start
    finally:
        engine.stop()


@torch.inference_mode()
def run_static(model, tokenizer, work: Workload, batch: int, adapter_names: list[str] | None) -> float:
    tokenizer.padding_side = "left"
    start = time.perf_counter()
    for b in range(0, len(work), batch):
        chunk = work[b: b + batch]
        enc = tokenizer([p for p, _ in chunk], return_tensors="pt", padding=True)
        new = max(n for _, n in chunk)
        extra = {} if adapter_names is None else {"adapter_names": [adapter_names[(b + i) % len(adapter_names)]
                                                                    for i in range(len(chunk))]}
        model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id, **extra)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16, help="static batch size of the transformers/PEFT peers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="16 requests, prompts 16-64, 16-64 new tokens")
    parser.add_argument("--cache-dir", type=Path, default=Settings().cache_dir)
    args = parser.parse_args()
    prompt_range, new_range = ((16, 64), (16, 64)) if args.quick else ((16, 256), (16, 256))
    requests = 16 if args.quick else args.requests

    settings = Settings(cache_dir=args.cache_dir, device="cpu", max_lora_rank=16, max_loras=args.adapters,
                        max_running=requests)
    base = load_base_model(settings)
    work = make_workload(base.tokenizer, requests, prompt_range, new_range, args.seed)
    tokens = sum(n for _, n in work)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        names = make_adapters(base.model, store, args.adapters)
        settings = settings.model_copy(update={"adapters_dir": store})
        times: dict[str, float] = {}
        timed(times, "engine, base model only", lambda: run_engine(settings, work, [base.name]))
        timed(times, f"engine, {args.adapters} adapters", lambda: run_engine(settings, work, names))
        timed(times, "transformers generate, base",
              lambda: run_static(base.model, base.tokenizer, work, args.batch, None))
        from peft import PeftModel

        peft = PeftModel.from_pretrained(base.model, store / names[0], adapter_name=names[0])
        for name in names[1:]:
            peft.load_adapter(store / name, adapter_name=name)
        timed(times, f"PEFT mixed batch, {args.adapters} adapters",
              lambda: run_static(peft, base.tokenizer, work, args.batch, names))
    print_table(times, tokens, requests, prompt_range, new_range, args)


def timed(times: dict[str, float], name: str, run) -> None:
    print(f"running: {name} ...", file=sys.stderr, flush=True)
    times[name] = run()
    print(f"  {times[name]:.1f} s", file=sys.stderr, flush=True)


def print_table(times: dict[str, float], tokens: int, requests: int, prompt_range, new_range, args) -> None:
    rate = {k: tokens / t for k, t in times.items()}
    base_engine, multi, hf, peft = rate.values()
    print(f"\n{requests} requests, prompts {prompt_range[0]}-{prompt_range[1]} tokens, "
          f"{new_range[0]}-{new_range[1]} new tokens ({tokens} in all), greedy, {torch.get_num_threads()} threads, "
          f"peers in static batches of {args.batch}\n")
    print("| system | output tok/s | seconds |")
    print("| --- | ---: | ---: |")
    for name, value in rate.items():
        print(f"| {name} | {value:.1f} | {times[name]:.1f} |")
    print("\n| ratio | measured | target |")
    print("| --- | ---: | ---: |")
    print(f"| multi-adapter engine / base-only engine | {multi / base_engine:.2f} | >= 0.90 |")
    print(f"| multi-adapter engine / PEFT mixed batch | {multi / peft:.2f} | >= 3.0 |")
    print(f"| base-only engine / transformers generate | {base_engine / hf:.2f} | >= 1.5 |")


if __name__ == "__main__":
    main()
