"""Throughput of several workloads through four systems, side by side in one process and one run.

    python bench/throughput.py                   # every workload below, full size
    python bench/throughput.py --workloads 64x32 # one of them
    python bench/throughput.py --quick           # small sizes: a smoke run (about 2 minutes)

Workloads (prompts 16-256 tokens, 16-256 new tokens unless said otherwise):
  64x32        64 requests over 32 distinct rank-16 all-linear adapters (the headline)
  32x32        32 requests over 32 adapters
  64x32-equal  64 requests over 32 adapters, every request 256 prompt + 256 new tokens
  64x32-ranks  64 requests over 32 all-linear adapters of ranks 8, 16, 32, 64 in one batch
  64x32-attn   64 requests over 32 rank-16 adapters on q/k/v/o only (as the adapters in adapters/)

Systems: the loraplex engine with every request on the base model; the engine with the requests
spread over the adapters (float32 slots, the default, and `--lora-dtype bfloat16`: the same adapters,
saved in float32, held in bfloat16); transformers `generate` on the base model in static batches; PEFT
mixed-adapter `generate(adapter_names=...)` in static batches. Every request generates exactly
its `max_tokens` (EOS ignored everywhere), greedy. Output tokens per second = new tokens / wall time.

The engine's base-only and adapter runs of a workload alternate (A B C C B A, `--repeats` each, the
fastest kept), so that the machine's drift over minutes does not enter their ratio.
Next to each adapters / base ratio: the bound memory traffic sets on it (the base-only run's time
plus reading the A and B of every distinct adapter of every step once, at the read bandwidth
measured in this run; half the bytes with bfloat16 slots). PEFT, the slowest by far, runs the
first `--peft-requests` requests only.
Writes bench/results/throughput.md and throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (RESULTS, Workload, forward_flops, in_thread, latency_summary,  # noqa: E402
                          lora_bytes, make_workload, matmul_rate, read_bandwidth, run_burst, start_engine,
                          write_json)
from server.adapters.layout import BaseLayout  # noqa: E402
from server.config import Settings  # noqa: E402
from server.models import load_base_model  # noqa: E402
from tests.peft_adapters import save_adapter  # noqa: E402


@dataclass(frozen=True)
class Spec:
    name: str
    requests: int
    adapters: int
    ranks: tuple[int, ...]   # adapter i has rank ranks[i % len(ranks)]
    equal: bool = False
    targets: tuple[str, ...] | None = None  # module names the adapters target; None = all linear

    @property
    def adapter_set(self) -> str:
        return "r" + "-".join(map(str, self.ranks)) + ("" if self.targets is None else "-" + "-".join(self.targets))


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def specs(quick: bool) -> list[Spec]:
    n, a = (8, 4) if quick else (64, 32)
    return [Spec(f"{n}x{a}", n, a, (16,)), Spec(f"{n // 2}x{a}", n // 2, a, (16,)),
            Spec(f"{n}x{a}-equal", n, a, (16,), equal=True), Spec(f"{n}x{a}-ranks", n, a, (8, 16, 32, 64)),
            Spec(f"{n}x{a}-attn", n, a, (16,), targets=ATTENTION)]


def make_adapters(base, folder: Path, spec: Spec) -> list[str]:
    """Real PEFT adapters (tests/peft_adapters.py), rank-cycled, on the spec's targets; returns their names."""
    names = []
    for i in range(spec.adapters):
        rank = spec.ranks[i % len(spec.ranks)]
        name = f"{spec.adapter_set}-{i}"
        save_adapter(base, folder / name, seed=i, scale_b=0.05, r=rank, lora_alpha=2 * rank,
                     target_modules=list(spec.targets) if spec.targets else "all-linear")
        names.append(name)
    return names


def run_engine(settings: Settings, work: Workload, models: list[str]) -> dict:
    """Warm every model once (slots, KV pages), then time the whole workload as one burst."""
    engine = start_engine(settings)
    try:
        warm = [(work[0][0][:40], 2)] * len(set(models))
        asyncio.run(run_burst(engine, warm, sorted(set(models)), "warm"))
        before = engine.lora.adapter_steps, engine.lora.row_moves
        seconds, timings = asyncio.run(run_burst(engine, work, models, "run"))
        return {"seconds": seconds, "adapter_steps": engine.lora.adapter_steps - before[0],
                "row_moves": engine.lora.row_moves - before[1],
                "preemptions": engine.stats().preemptions, **latency_summary(timings)}
    finally:
        engine.stop()


@torch.inference_mode()
def run_static(model, tokenizer, work: Workload, batch: int, adapter_names: list[str] | None) -> dict:
    tokenizer.padding_side = "left"
    start = time.perf_counter()
    for b in range(0, len(work), batch):
        chunk = work[b: b + batch]
        enc = tokenizer([p for p, _ in chunk], return_tensors="pt", padding=True)
        new = max(n for _, n in chunk)
        extra = {} if adapter_names is None else {"adapter_names": adapter_names[b: b + len(chunk)]}
        model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id, **extra)
    return {"seconds": time.perf_counter() - start}


ENGINE_RUNS = ("engine_base", "engine_multi", "engine_multi_bf16")  # base only, adapters, bfloat16 slots


def paired_runs(spec: Spec, cfg: Settings, work: Workload, base_models: list[str], models: list[str],
                repeats: int) -> dict[str, dict]:
    """The engine base-only, with adapters, and with adapters in bfloat16 slots, run in A B C C B A
    order `repeats` times over, the fastest of each kept: the machine's speed drifts over minutes,
    and a ratio of two runs taken far apart measures the drift too."""
    runs: dict[str, list[dict]] = {kind: [] for kind in ENGINE_RUNS}
    settings = {"engine_base": cfg, "engine_multi": cfg,
                "engine_multi_bf16": cfg.model_copy(update={"lora_dtype": "bfloat16"})}
    labels = {"engine_base": "base only", "engine_multi": f"{spec.adapters} adapters",
              "engine_multi_bf16": f"{spec.adapters} adapters, bfloat16 slots"}
    for i in range(repeats):
        for kind in (ENGINE_RUNS if i % 2 == 0 else ENGINE_RUNS[::-1]):
            runs[kind].append(timed(f"{spec.name}: engine, {labels[kind]}", lambda: run_engine(
                settings[kind], work, base_models if kind == "engine_base" else models)))
    best = {kind: min(r, key=lambda run: run["seconds"]) for kind, r in runs.items()}
    for kind, r in runs.items():
        best[kind]["all_seconds"] = [round(run["seconds"], 1) for run in r]
    return best


def timed(label: str, run) -> dict:
    print(f"running: {label} ...", file=sys.stderr, flush=True)
    result = run()
    print(f"  {result['seconds']:.1f} s", file=sys.stderr, flush=True)
    return result


def traffic(spec: Spec, layout: BaseLayout, row: dict, bandwidth: float, run: str = "engine_multi",
            elem: int = 4) -> dict:
    """The bound memory traffic sets on the adapters / base ratio of one workload.

    A run can be no faster than the base-only run of the same requests plus the time to read,
    once per step, the A and B of every distinct adapter in that step (counted by the engine:
    `adapter_steps`); at this machine's read bandwidth. `padded` is the same with every adapter
    read at the slots' padded rank (`--max-lora-rank`), which is what the CPU op reads. `elem`:
    bytes per weight in the slots (4 float32, 2 bfloat16).
    """
    ranks = [spec.ranks[i % len(spec.ranks)] for i in range(spec.adapters)]
    mean_bytes = sum(lora_bytes(layout, r, spec.targets, elem) for r in ranks) / len(ranks)
    padded_bytes = lora_bytes(layout, max(spec.ranks), spec.targets, elem)
    steps = row[run]["adapter_steps"]
    base_s = row["engine_base"]["seconds"]
    bound = base_s / (base_s + steps * mean_bytes / bandwidth)
    padded = base_s / (base_s + steps * padded_bytes / bandwidth)
    return {"bandwidth_gbs": bandwidth / 1e9, "adapter_mb": mean_bytes / 1e6, "adapter_steps": steps,
            "lora_gb": steps * mean_bytes / 1e9, "lora_read_s": steps * mean_bytes / bandwidth, "bound": bound,
            "padded_bound": padded}


def arithmetic(row: dict, flops: float, rates: dict[int, float]) -> dict:
    """The bound arithmetic sets on base-only engine / generate: no engine can serve the workload's
    FLOPs (bench/common.py `forward_flops`) faster than float32 matmuls run at 64 rows (the engine's
    batch) on this machine; `generate`'s own time over that floor is the best ratio possible."""
    floor = flops / rates[64]
    return {"gflop": flops / 1e9, "gflops_at_64_rows": rates[64] / 1e9, "floor_s": floor,
            "bound": row["generate"]["seconds"] / floor,
            "generate_gflops": flops / row["generate"]["seconds"] / 1e9,
            "engine_base_gflops": flops / row["engine_base"]["seconds"] / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="*", help="names to run (default: all)")
    parser.add_argument("--batch", type=int, default=16, help="static batch size of the transformers/PEFT peers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2,
                        help="engine runs per system and workload, base and adapters alternated; the fastest counts")
    parser.add_argument("--quick", action="store_true", help="8 requests over 4 adapters, 8-24 tokens")
    parser.add_argument("--peft-requests", type=int, default=16,
                        help="PEFT runs the first N requests of each workload (its rate is theirs; 0 = all)")
    parser.add_argument("--cache-dir", type=Path, default=Settings().cache_dir)
    args = parser.parse_args()
    prompt_range, new_range = ((8, 24), (8, 24)) if args.quick else ((16, 256), (16, 256))
    todo = [s for s in specs(args.quick) if not args.workloads or s.name in args.workloads]

    settings = Settings(cache_dir=args.cache_dir, device="cpu")
    base = in_thread(load_base_model, settings)
    layout = BaseLayout.from_model(base.model)
    bandwidth = in_thread(read_bandwidth)
    rates = {64: in_thread(matmul_rate, base.model, layout, 64)}
    works = {(s.requests, s.equal): make_workload(base.tokenizer, s.requests, prompt_range, new_range, args.seed,
                                                  s.equal) for s in todo}
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        stores, names = {}, {}
        for spec in todo:
            if spec.adapter_set not in stores:
                stores[spec.adapter_set] = Path(tmp) / spec.adapter_set
                names[spec.adapter_set] = in_thread(make_adapters, base.model, stores[spec.adapter_set], spec)
        base_runs: dict[tuple, dict] = {}
        for spec in todo:
            key = (spec.requests, spec.equal)
            work = works[key]
            cfg = settings.model_copy(update={"adapters_dir": stores[spec.adapter_set], "max_loras": spec.adapters,
                                              "max_lora_rank": max(spec.ranks), "max_running": spec.requests,
                                              "max_cpu_loras": spec.adapters})
            if key not in base_runs:
                base_runs[key] = {"first": spec.name,
                                  "generate": timed(f"{spec.name}: transformers generate",
                                                    lambda: in_thread(run_static, base.model, base.tokenizer, work,
                                                                      args.batch, None))}
            models = [names[spec.adapter_set][i % spec.adapters] for i in range(len(work))]
            engine_runs = paired_runs(spec, cfg, work, [base.name] * len(work), models, args.repeats)
            rows[spec.name] = {"spec": spec.__dict__, "tokens": sum(n for _, n in work), **engine_runs,
                               "generate": base_runs[key]["generate"], "models": models,
                               "base_runs_of": base_runs[key]["first"]}
            rows[spec.name]["traffic"] = traffic(spec, layout, rows[spec.name], bandwidth)
            rows[spec.name]["traffic_bf16"] = traffic(spec, layout, rows[spec.name], bandwidth, "engine_multi_bf16", 2)
            rows[spec.name]["arithmetic"] = arithmetic(rows[spec.name], in_thread(forward_flops, base.model, layout,
                                                                                 base.tokenizer, work), rates)
        # PEFT last: it wraps base.model in place, which would change the `generate` runs above.
        from peft import PeftModel

        peft = None
        for spec in todo:
            store, set_names = stores[spec.adapter_set], names[spec.adapter_set]
            for name in set_names:
                if peft is None:
                    peft = PeftModel.from_pretrained(base.model, store / name, adapter_name=name)
                elif name not in peft.peft_config:
                    peft.load_adapter(store / name, adapter_name=name)
            work = works[(spec.requests, spec.equal)][:args.peft_requests or None]
            models = rows[spec.name]["models"][:len(work)]
            rows[spec.name]["peft"] = timed(f"{spec.name}: PEFT mixed batch ({len(work)} requests)",
                                            lambda: in_thread(run_static, peft, base.tokenizer, work, args.batch,
                                                              models))
            rows[spec.name]["peft"]["tokens"] = sum(n for _, n in work)
    for row in rows.values():
        row.pop("models")
        for system in (*ENGINE_RUNS, "generate", "peft"):
            row[system]["tok_s"] = row[system].get("tokens", row["tokens"]) / row[system]["seconds"]
    meta = {"threads": in_thread(torch.get_num_threads), "batch": args.batch, "prompt_range": prompt_range,
            "repeats": args.repeats,
            "peft_requests": args.peft_requests,
            "new_range": new_range, "quick": args.quick, "model": base.name}
    text = render(rows, meta)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "throughput.md").write_text(text)
    write_json("throughput.json", {"meta": meta, "workloads": rows})


def render(rows: dict[str, dict], meta: dict) -> str:
    """Markdown: one table of rates, one of ratios with the memory-traffic floor beside them."""
    pr, nr = meta["prompt_range"], meta["new_range"]
    out = [f"# Throughput ({meta['model']}, CPU, {meta['threads']} threads{', quick' if meta['quick'] else ''})\n",
           f"Prompts {pr[0]}-{pr[1]} tokens, {nr[0]}-{nr[1]} new tokens (\"equal\": every request {pr[1]} + "
           f"{nr[1]}), greedy, EOS ignored; peers in static batches of {meta['batch']}.\n",
           "| workload | system | output tok/s | seconds | ITL p50 ms |", "| --- | --- | ---: | ---: | ---: |"]
    labels = {"engine_base": "engine, base only", "engine_multi": "engine, adapters",
              "engine_multi_bf16": "engine, adapters in bfloat16 slots", "generate": "transformers generate",
              "peft": "PEFT mixed batch"}
    for name, row in rows.items():
        for key, label in labels.items():
            run = row[key]
            itl = f"{run['itl_p50_ms']:.1f}" if "itl_p50_ms" in run else ""
            same = row["base_runs_of"] != name and key == "generate"
            label += f" (the {row['base_runs_of']} run: same requests)" if same else ""
            out.append(f"| {name} | {label} | {run['tok_s']:.1f} | {run['seconds']:.1f} | {itl} |")
    any_row = next(iter(rows.values()))
    out += ["", f"PEFT runs the first {meta.get('peft_requests') or 'all'} requests of each workload "
            "(whole static batches); its rate is over their tokens. The engine's three runs of a workload "
            f"alternate {meta['repeats']} times each (A B C C B A), the fastest of each shown. \"bfloat16 slots\": "
            "`--lora-dtype bfloat16`, the same float32-saved adapters rounded to bfloat16 in the slots (half the "
            "bytes per step; the op still computes in float32).\n",
            f"Memory traffic: read bandwidth {any_row['traffic']['bandwidth_gbs']:.1f} GB/s (a sum over 512 MiB in "
            "this run). Bound: the base-only run's time plus reading, once per step, the A and B of every distinct "
            "adapter in the step (the engine counts them), at that bandwidth; \"padded\": the same with every "
            "adapter at the slots' padded rank, which the batched-matmul CPU path reads (the compiled kernels "
            "read each adapter's own rank).\n",
            f"Arithmetic: float32 matmuls over the model's shapes run at {any_row['arithmetic']['gflops_at_64_rows']:.0f} "
            "GFLOP/s at 64 rows here; no engine serves a workload's FLOPs (every linear layer per token fed, the LM "
            "head per new token, attention over the context) faster, so `generate`'s time over that floor bounds "
            "base-only engine / generate.\n",
            "| workload | ratio | measured | target | adapter MB | adapter-steps | LoRA GB read | bound (padded) |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in rows.items():
        r = {k: row[k]["tok_s"] for k in labels}
        ratios = (("engine_multi", "adapters / base-only engine", row["traffic"]),
                  ("engine_multi_bf16", "adapters, bfloat16 slots / base-only engine", row["traffic_bf16"]))
        for run, label, t in ratios:
            cols = f"{t['adapter_mb']:.1f} | {t['adapter_steps']} | {t['lora_gb']:.1f}"
            out.append(f"| {name} | {label} | {r[run] / r['engine_base']:.2f} | >= 0.90 "
                       f"| {cols} | {t['bound']:.2f} ({t['padded_bound']:.2f}) |")
        out.append(f"| {name} | adapters engine / PEFT mixed batch | {r['engine_multi'] / r['peft']:.2f} | >= 3.0 "
                   f"| | | | |")
        out.append(f"| {name} | base-only engine / generate | {r['engine_base'] / r['generate']:.2f} | >= 1.5 "
                   f"| | | | {row['arithmetic']['bound']:.2f} (arithmetic) |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
