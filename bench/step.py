"""One engine step in isolation: a decode step of the real runner over the default model, timed
with and without adapters, and profiled (torch profiler) to show where its time goes.

    python bench/step.py                       # 64 decoding sequences, 32 rank-16 all-linear adapters
    python bench/step.py --seqs 32 --adapters 32 --context 200 --profile
    python bench/step.py --lora-dtypes float32 # float32 slots only (default: float32 and bfloat16)
    python bench/step.py --targets q_proj,v_proj   # adapters on q and v only (PEFT's default for Llama)
    python bench/step.py --split --batches 1,8,64  # lean decoder vs transformers forward: where a step goes

No engine thread, scheduler or sampler: `ModelRunner.step` on hand-made sequences whose KV
blocks are allocated but hold zeros (attention reads them all the same).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.adapters.layout import BaseLayout  # noqa: E402
from server.adapters.peft_format import LoraModuleWeights, ParsedAdapter  # noqa: E402
from server.config import Settings  # noqa: E402
from server.engine.attention import CPU_ATTENTION_KERNELS, decode_kernel_applies, use_paged_attention  # noqa: E402
from server.engine.kv_cache import KVCache  # noqa: E402
from server.engine.runner import ModelRunner  # noqa: E402
from server.engine.scheduler import ScheduledSeq  # noqa: E402
from server.lora.model import LoraModel  # noqa: E402
from server.lora.ops import CPU_LORA_KERNELS, backend_for  # noqa: E402
from server.models import load_base_model  # noqa: E402


def random_adapter(layout: BaseLayout, rank: int, seed: int, targets: set[str] | None = None) -> ParsedAdapter:
    """A parsed adapter with random weights on `targets` (suffixes like 'q_proj'; None = all linear)."""
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name, (fan_in, fan_out) in layout.linear.items():
        if targets is not None and name.rpartition(".")[2] not in targets:
            continue
        modules[name] = LoraModuleWeights(a=torch.randn(rank, fan_in, generator=gen) / fan_in ** 0.5,
                                          b=torch.randn(fan_out, rank, generator=gen) * 0.01, scale=2.0)
    return ParsedAdapter(rank=rank, alpha=2.0 * rank, target_modules=tuple(sorted(modules)), modules=modules,
                         config={}, size_bytes=sum(4 * (w.a.numel() + w.b.numel()) for w in modules.values()))


class DecodeRig:
    """A runner, its KV cache and `seqs` decoding sequences of `context` tokens each."""

    def __init__(self, base, seqs: int, adapters: int, context: int, ranks: tuple[int, ...] = (16,),
                 cpu_kernel: str = "auto", attention_kernel: str = "auto",
                 lora_dtype: torch.dtype = torch.float32, targets: set[str] | None = None, lean: bool = True) -> None:
        """Slot i holds a random adapter of rank `ranks[i % len(ranks)]` on `targets` (None: every
        linear module); buffers are max(ranks) wide. `lean`: the runner's lean decoder forward where it applies."""
        model = base.model
        layout = BaseLayout.from_model(model)
        backend = backend_for(torch.device("cpu"), torch.float32, cpu_kernel)
        self.lora = LoraModel(model, layout, max(adapters, 1), max(ranks), backend, lora_dtype)
        paged = use_paged_attention(model)
        block = 16
        self.kv = KVCache.from_token_budget(model.config, seqs * (context + block), block)
        decode_kernel = decode_kernel_applies(torch.device("cpu"), torch.float32, attention_kernel)
        self.runner = ModelRunner(self.lora, paged, self.kv, decode_kernel, lean=lean)
        for slot in range(adapters):
            self.lora.write_slot(slot, random_adapter(layout, ranks[slot % len(ranks)], slot, targets))
        self.context = context
        self.seqs = []
        for i in range(seqs):
            blocks = self.kv.allocator.allocate(self.kv.blocks_for(context))
            self.seqs.append(SimpleNamespace(token_ids=[(7 * i + j) % 1000 + 10 for j in range(context)],
                                             num_computed=context - 1, blocks=blocks, slot=-1,
                                             prompt_logprobs=None))
        self.set_adapters(adapters)

    def set_adapters(self, count: int) -> None:
        """Spread the sequences round-robin over `count` slots (0 = base model only)."""
        for i, seq in enumerate(self.seqs):
            seq.slot = i % count if count else -1

    def step(self) -> float:
        for seq in self.seqs:
            seq.num_computed = self.context - 1
        plan = [ScheduledSeq(seq, 1, True) for seq in self.seqs]
        start = time.perf_counter()
        self.runner.step(plan)
        return time.perf_counter() - start


def interleaved(variants: dict[str, tuple[DecodeRig, int]], repeats: int) -> dict[str, float]:
    """Median step seconds per variant (name -> its rig and adapter count), interleaved A/B/C/A/B/C."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, (rig, count) in variants.items():
            rig.set_adapters(count)
            times[name].append(rig.step())
    return {k: statistics.median(v) for k, v in times.items()}


def profile(rig: DecodeRig, count: int, steps: int = 3, rows: int = 18) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    rig.set_adapters(count)
    rig.step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            rig.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# Profiler op names -> the part of a step they are (anything else, and Python, is "rest").
PARTS = {"quantized linears": ("loraplex::quant_linear_forward", "loraplex::quant_linear"),
         "float linears": ("aten::linear",),  # (a quantized linear's prefill tiles call aten::mm: not these)
         "LoRA op": ("loraplex::shrink", "loraplex::expand", "loraplex::lora_pool_group"),
         "attention kernels": ("loraplex::paged_decode_attention", "loraplex::rope_cache_write"),
         "add+norm kernel": ("loraplex::add_rms_norm",)}


def split(rig: DecodeRig, count: int, seconds: float, steps: int = 5) -> dict[str, float]:
    """Milliseconds per step of each part (the ops' own time under the profiler, over `steps` steps), "rest"
    being the unprofiled step time `seconds` less them: Python, module calls and the small torch ops."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    rig.set_adapters(count)
    rig.step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            rig.step()
    totals = {part: 0.0 for part in PARTS}
    for event in prof.key_averages():
        for part, prefixes in PARTS.items():
            if event.key.startswith(prefixes):
                totals[part] += event.cpu_time_total / 1e3 / steps
    parts = {k: v for k, v in totals.items() if v > 0}
    parts["rest"] = seconds * 1e3 - sum(parts.values())
    return parts


def split_table(base, batches: list[int], adapters: int, context: int, repeats: int) -> str:
    """Lean decoder against the transformers forward at each batch size: ms per step and its parts."""
    lines = ["| batch | forward | ms/step | parts (ms) |", "| ---: | --- | ---: | --- |"]
    for batch in batches:
        rigs = {name: DecodeRig(SimpleNamespace(model=copy.deepcopy(base.model)), batch, max(adapters, 1), context,
                                lean=lean) for name, lean in (("lean", True), ("transformers", False))}
        if rigs["lean"].runner.lean is None:
            raise SystemExit("the lean decoder does not apply to this model (see the log)")
        for rig in rigs.values():
            rig.step()
        medians = interleaved({name: (rig, adapters) for name, rig in rigs.items()}, repeats)
        for name, rig in rigs.items():
            parts = split(rig, adapters, medians[name])
            text = ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
            lines.append(f"| {batch} | {name} | {medians[name] * 1e3:.2f} | {text} |")
        print(lines[-2], lines[-1], sep="\n", flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--ranks", default="16", help="comma-separated ranks, cycled over the adapters")
    parser.add_argument("--targets", help="comma-separated module names the adapters target (default: all linear)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--cpu-lora-kernel", choices=CPU_LORA_KERNELS, default="auto")
    parser.add_argument("--cpu-attention-kernel", choices=CPU_ATTENTION_KERNELS, default="auto")
    parser.add_argument("--split", action="store_true",
                        help="lean decoder vs transformers forward at each of --batches: ms per step and its parts")
    parser.add_argument("--batches", default="1,8,64", help="decoding sequences per step, for --split")
    parser.add_argument("--model", help="--split: a GGUF file or model folder (default: the embedded model)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--lora-dtypes", default="float32,bfloat16",
                        help="the adapter slots' dtypes to compare (the server's `--lora-dtype`), one rig each")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    blocks = "keep" if args.split else "auto"  # --split: the quantized base (the embedded model's GGUF blocks)
    base = load_base_model(Settings(device="cpu", model=args.model, gguf_blocks=blocks))
    if args.split:
        print(f"threads: {torch.get_num_threads()}; {args.adapters} adapters; context {args.context}")
        print(split_table(base, [int(b) for b in args.batches.split(",")], args.adapters, args.context, args.repeats))
        return
    ranks = tuple(int(r) for r in args.ranks.split(","))
    targets = set(args.targets.split(",")) if args.targets else None
    dtypes = args.lora_dtypes.split(",")
    # One rig per dtype, each over its own copy of the model (a rig wraps its model's layers in place).
    models = [base.model] + [copy.deepcopy(base.model) for _ in dtypes[1:]]
    rigs = {dtype: DecodeRig(SimpleNamespace(model=model), args.seqs, args.adapters, args.context, ranks,
                             args.cpu_lora_kernel, args.cpu_attention_kernel, getattr(torch, dtype), targets)
            for dtype, model in zip(dtypes, models)}
    first = rigs[dtypes[0]]
    attention = "kernel" if first.runner.decode_kernel else "torch"
    print(f"LoRA op: {first.lora.backend.name}; decode attention: {attention}")
    names = {d: f"{args.adapters} adapters" + ("" if d == "float32" else f", {d} slots") for d in dtypes}
    variants = {"base": (first, 0), **{names[d]: (rig, args.adapters) for d, rig in rigs.items()}}
    for rig in rigs.values():
        rig.step()
    medians = interleaved(variants, args.repeats)
    for name, seconds in medians.items():
        print(f"{name}: {seconds * 1e3:.1f} ms/step")
    for dtype in dtypes:
        print(f"ratio base/LoRA step time, {dtype} slots: {medians['base'] / medians[names[dtype]]:.3f}")
    if args.profile:
        print(f"\n=== profile, 0 adapters ===\n{profile(first, 0)}")
        for dtype, rig in rigs.items():
            print(f"\n=== profile, {names[dtype]} ===\n{profile(rig, args.adapters)}")


if __name__ == "__main__":
    main()
