"""The loraplex engine in-process on a CUDA GPU: correctness against PEFT, then throughput and decode
step time against the memory-bandwidth floor, on random-weight Llama models loaded through the
engine's real `--model <folder>` path.

    python bench/gpu_engine.py                       # everything (about 6-8 minutes on an H100)
    python bench/gpu_engine.py --quick               # correctness + a short throughput smoke run
    python bench/gpu_engine.py --layers-7b 8         # fewer 7B-like layers (time / memory)
    python bench/gpu_engine.py --device cpu --tiny   # CPU smoke of the script itself (tiny shape)

No model hub: each model is built from a LlamaConfig with random weights, saved with a trivial
word-level tokenizer (token i is the word "w<i>", so a prompt of n words is exactly n tokens and a
completion's words are its token ids) and loaded by `load_base_model(Settings(model=folder))`.

(1) Correctness, default shape: 4 random PEFT adapters (rank 8 and 16, all-linear and q/v) and the
base model in ONE mixed engine batch, greedy, vs PEFT's per-adapter `generate`: token-identical in
float32; in bfloat16 the engine's chosen-token logprobs vs PEFT float32 (teacher-forced on the
engine's tokens), max |difference| in nats.
(2) Throughput, both shapes, bfloat16: B requests (fixed prompt length, ignore_eos, fixed new
tokens), base-only vs 32 distinct rank-16 all-linear adapters. Decode step time = (t(N2) - t(N1)) /
(N2 - N1) from two bursts that differ only in new tokens, so prefill cancels out. Bandwidth floor =
bytes one decode step must read (base weights + the batch's distinct adapters' LoRA weights, and
separately the KV cache) / the card's measured device-to-device copy bandwidth.
(3) Peers on the default shape: transformers `generate` (base) and PEFT mixed batch
(`adapter_names=`), one static batch of the same B requests.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_common import DEFAULT, LLAMA7B, TINY, Shape, copy_bandwidth  # noqa: E402
from server.config import Settings  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.request import GenerationRequest, SamplingParams  # noqa: E402
from server.models import load_base_model  # noqa: E402


CORRECTNESS_ADAPTERS = {
    "c-all-r8": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "c-all-r16": dict(r=16, lora_alpha=16, target_modules="all-linear"),
    "c-qv-r16": dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
    "c-mlp-r8": dict(r=8, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True),
}


# Models and tokenizer ------------------------------------------------------------------------------

def save_word_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer: token i <-> the word "w<i>", split on whitespace, no special tokens."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(folder)


def llama_config(shape: Shape, layers: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.inter,
                       num_hidden_layers=layers or shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, max_position_embeddings=4096,
                       tie_word_embeddings=shape.tied, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def save_random_llama(folder: Path, shape: Shape, dtype: torch.dtype, device: str, layers: int | None = None) -> Path:
    """Random-weight Llama of `shape` saved as safetensors + the word tokenizer; built on `device` (fast init)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(shape, layers)).to(dtype)
    model.save_pretrained(folder)
    save_word_tokenizer(folder, shape.vocab)
    del model
    free(device)
    return folder


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def words(ids) -> str:
    return " ".join(f"w{int(i)}" for i in ids)


def ids_of(text: str) -> list[int]:
    return [int(w[1:]) for w in text.split()]


def random_prompt(rng: torch.Generator, vocab: int, length: int) -> list[int]:
    return torch.randint(3, vocab, (length,), generator=rng).tolist()


# Adapters --------------------------------------------------------------------------------------------

def save_many_adapters(base: torch.nn.Module, store: Path, count: int, rank: int, scale_b: float) -> list[str]:
    """`count` distinct rank-`rank` all-linear PEFT adapters, injected once into `base` and re-randomized per seed.

    Avoids a deep copy of a 13 GB base per adapter; `base` is restored (unloaded) before returning.
    """
    from tests.peft_adapters import random_peft_model

    peft = random_peft_model(base, seed=0, scale_b=scale_b, copy_base=False, r=rank, lora_alpha=2 * rank,
                             target_modules="all-linear")
    names = []
    with torch.no_grad():
        for i in range(count):
            torch.manual_seed(1000 + i)
            for name, param in peft.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    param.normal_(0.0, 0.02 if "lora_A" in name else 0.02 * scale_b)
            peft.save_pretrained(store / f"bench-{i}")
            names.append(f"bench-{i}")
    peft.unload()
    return names


# Engine driving ----------------------------------------------------------------------------------------

def make_engine(folder: Path, store: Path, device: str, dtype: str, **overrides) -> Engine:
    settings = Settings(model=str(folder), device=device, dtype=dtype, adapters_dir=store, **overrides)
    engine = Engine(load_base_model(settings), settings)
    rejected = engine.load_store()
    if rejected:
        raise RuntimeError(f"adapters rejected by the store: {rejected}")
    engine.start()
    return engine


def run_requests(engine: Engine, items: list[tuple[str, list[int], int]], logprobs: int | None = None):
    """items: (model, prompt ids, new tokens); all submitted at once (one mixed batch), greedy, ignore_eos."""
    async def burst():
        reqs = [GenerationRequest(f"r{i}-{time.monotonic_ns()}", model, words(prompt),
                                  SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, logprobs=logprobs))
                for i, (model, prompt, new) in enumerate(items)]
        return await asyncio.gather(*(engine.generate(r) for r in reqs))

    return asyncio.run(burst())


# (1) Correctness -----------------------------------------------------------------------------------------

@torch.inference_mode()
def peft_greedy(model, prompt: list[int], new: int, device: str) -> list[int]:
    ids = torch.tensor([prompt], device=device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


@torch.inference_mode()
def peft_token_logprobs(model, prompt: list[int], gen: list[int], device: str) -> torch.Tensor:
    """float32 log-probabilities [len(gen)] of `gen` teacher-forced after `prompt`."""
    ids = torch.tensor([prompt + gen], device=device)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float()
    return logits.log_softmax(-1).gather(1, torch.tensor(gen, device=device)[:, None])[:, 0]


def correctness(shape: Shape, tmp: Path, device: str, new: int, report: dict) -> None:
    from transformers import AutoModelForCausalLM

    from tests.peft_adapters import peft_reference, save_adapter

    folder = save_random_llama(tmp / "corr-model", shape, torch.float32, device)
    store = tmp / "corr-store"
    base32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    for i, (name, kwargs) in enumerate(CORRECTNESS_ADAPTERS.items()):
        save_adapter(base32, store / name, seed=200 + i, scale_b=1.0, **kwargs)
    rng = torch.Generator().manual_seed(1)
    models = ["base", *CORRECTNESS_ADAPTERS] * 2
    items = [(m, random_prompt(rng, shape.vocab, 5 + 7 * i), new) for i, m in enumerate(models)]

    refs: dict[str, torch.nn.Module] = {"base": base32}
    refs.update({name: peft_reference(base32, store / name) for name in CORRECTNESS_ADAPTERS})
    expected = [peft_greedy(refs[m], p, n, device) for m, p, n in items]
    base_out = [peft_greedy(base32, p, n, device) for _, p, n in items]
    report["adapters_change_output"] = sum(e != b for e, b, (m, _, _) in zip(expected, base_out, items) if m != "base")

    for dtype in ("float32", "bfloat16"):
        engine = make_engine(folder, store, device, dtype, max_loras=8, max_lora_rank=16, kv_cache_tokens=4096)
        served = [(folder.name if m == "base" else m, p, n) for m, p, n in items]
        try:
            results = run_requests(engine, served, logprobs=0)
        finally:
            engine.stop()
            del engine
            free(device)
        got = [ids_of(r.text) for r in results]
        if dtype == "float32":
            report["f32_identical"] = sum(g == e for g, e in zip(got, expected))
            report["f32_total"] = len(items)
            report["f32_first_mismatch"] = [next((j for j, (a, b) in enumerate(zip(g, e)) if a != b), None)
                                            for g, e in zip(got, expected)]
        else:
            diffs = []
            for (m, p, _), g, r in zip(items, got, results):
                ref = peft_token_logprobs(refs[m], p, g, device)
                eng = torch.tensor([t.logprob for t in r.logprobs], device=device)
                diffs.append((ref - eng).abs().max().item())
            report["bf16_greedy_identical"] = sum(g == e for g, e in zip(got, expected))
            report["bf16_max_logprob_diff"] = max(diffs)
            report["bf16_mean_of_max_logprob_diff"] = sum(diffs) / len(diffs)
    del refs, base32
    free(device)


# (2) Throughput and the bandwidth floor -------------------------------------------------------------------

def base_step_bytes(model: torch.nn.Module) -> int:
    """Bytes of base weights one decode step reads: every matrix once; the input embedding only as rows (0)
    unless it is tied to the lm_head (then it is read in full once, as the head)."""
    total = 0
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    for p in model.parameters():
        if p is embed and not tied:
            continue
        total += p.numel() * p.element_size()
    return total


def adapter_bytes(path: Path, elt: int) -> int:
    from safetensors import safe_open

    with safe_open(path / "adapter_model.safetensors", "pt") as f:
        return sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys()) * elt


def kv_step_bytes(config, batch: int, mean_context: float, elt: int) -> float:
    head_dim = config.hidden_size // config.num_attention_heads
    return batch * mean_context * config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * elt


def throughput(shape: Shape, tmp: Path, device: str, args, bandwidth: float, report: dict, layers: int | None) -> None:
    tag = shape.name.split()[0]
    folder = save_random_llama(tmp / f"tp-{tag}", shape, torch.bfloat16, device, layers)
    store = tmp / f"tp-{tag}-store"
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    names = save_many_adapters(base, store, args.adapters, 16, scale_b=1.0)
    floor_base = base_step_bytes(base)
    one_adapter = adapter_bytes(store / names[0], 2)
    config = base.config
    del base
    free(device)

    b, p, (n1, n2) = args.batch, args.prompt, args.new
    engine = make_engine(folder, store, device, "bfloat16", max_loras=args.adapters, max_lora_rank=16,
                         max_running=b, kv_cache_tokens=b * (p + n2) + 1024, max_batched_tokens=args.batched_tokens,
                         max_queue=4 * b)
    rng = torch.Generator().manual_seed(2)
    prompts = [random_prompt(rng, shape.vocab, p) for _ in range(b)]
    out: dict = {"layers": config.num_hidden_layers, "batch": b, "prompt": p, "new": [n1, n2]}
    try:
        run_requests(engine, [(folder.name, prompts[0], 4), (names[0], prompts[1], 4)])  # warm-up / compile
        for label, models in (("base", [folder.name] * b), ("multi", [names[i % len(names)] for i in range(b)])):
            walls = {}
            for n in (n1, n2):
                start = time.perf_counter()
                results = run_requests(engine, list(zip(models, prompts, [n] * b)))
                walls[n] = time.perf_counter() - start
                assert all(r.completion_tokens == n for r in results)
            step = (walls[n2] - walls[n1]) / (n2 - n1)
            distinct = len(set(models)) if label == "multi" else 0
            weights = floor_base + distinct * one_adapter
            kv = kv_step_bytes(config, b, p + (n1 + n2) / 2, 2)
            out[label] = {"tok_s": b * n2 / walls[n2], "wall_s": walls[n2], "step_ms": 1000 * step,
                          "floor_weights_ms": 1000 * weights / bandwidth,
                          "floor_with_kv_ms": 1000 * (weights + kv) / bandwidth,
                          "step_over_floor": step / ((weights + kv) / bandwidth)}
            print(f"  {tag} {label}: {out[label]}", file=sys.stderr, flush=True)
        out["ratio"] = out["multi"]["tok_s"] / out["base"]["tok_s"]
    finally:
        engine.stop()
        del engine
        free(device)
    out["bytes"] = {"base_weights": floor_base, "one_adapter": one_adapter}
    if args.peers and shape is not LLAMA7B:
        out["peers"] = peers(folder, store, names, prompts, n2, device)
    report[tag] = out


@torch.inference_mode()
def peers(folder: Path, store: Path, names: list[str], prompts: list[list[int]], new: int, device: str) -> dict:
    """transformers generate (base) and PEFT mixed batch, one static batch of the same requests."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    ids = torch.tensor(prompts, device=device)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, pad_token_id=0)
    out = {}

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(label, fn):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - start
        out[label] = {"tok_s": len(prompts) * new / wall, "wall_s": wall}
        print(f"  peer {label}: {out[label]}", file=sys.stderr, flush=True)

    timed("transformers_generate_base", lambda: base.generate(input_ids=ids, **kw))
    peft = PeftModel.from_pretrained(base, store / names[0], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(store / name, adapter_name=name)
    mixed = [names[i % len(names)] for i in range(len(prompts))]
    timed("peft_mixed_batch", lambda: peft.generate(input_ids=ids, adapter_names=mixed, **kw))
    del peft, base
    free(device)
    return out


# Main -----------------------------------------------------------------------------------------------------

def step(report: dict, key: str, fn) -> None:
    """Run one part; a failure is recorded with its traceback and the rest still runs."""
    print(f"== {key}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        fn()
    except Exception:  # noqa: BLE001  (first CUDA runs: every failure must be seen, not stop the run)
        report.setdefault("errors", {})[key] = traceback.format_exc()
        print(traceback.format_exc(), file=sys.stderr, flush=True)
    print(f"   {key}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="correctness + a short default-shape throughput run")
    parser.add_argument("--tiny", action="store_true", help="tiny shape everywhere (CPU smoke of this script)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, nargs=2, default=[32, 160], help="N1 N2: new tokens of the two bursts")
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--batched-tokens", type=int, default=2048)
    parser.add_argument("--layers-7b", type=int, default=32)
    parser.add_argument("--no-peers", dest="peers", action="store_false")
    parser.add_argument("--skip", nargs="*", default=[], help="parts to skip: correctness default 7b")
    parser.add_argument("--json", type=Path, help="write the report here too")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 must be float32 for the token-identical check
    shapes = (TINY, TINY) if args.tiny else (DEFAULT, LLAMA7B)
    if args.quick:
        args.new, args.skip = [8, 24], [*args.skip, "7b"]
    report: dict = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
                    "torch": torch.__version__, "args": vars(args) | {"json": str(args.json)}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if "correctness" not in args.skip:
            part = report.setdefault("correctness", {})
            step(report, "correctness", lambda: correctness(shapes[0], tmp, args.device, 24, part))
        bandwidth = copy_bandwidth(args.device)
        report["copy_bandwidth_GBps"] = bandwidth / 1e9
        if "default" not in args.skip:
            step(report, "throughput-default",
                 lambda: throughput(shapes[0], tmp, args.device, args, bandwidth, report, None))
        if "7b" not in args.skip:
            step(report, "throughput-7b", lambda: throughput(shapes[1], tmp, args.device, args, bandwidth, report,
                                                            None if args.tiny else args.layers_7b))
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)
    sys.exit(1 if report.get("errors") else 0)


if __name__ == "__main__":
    main()
