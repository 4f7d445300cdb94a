"""Memory of loading a GGUF base with its blocks kept: the direct load (the model built from the file, tensor by
tensor) against the float32-first route (transformers' float32 model from the cached safetensors copy, then the
blocks swapped in), each in a fresh process.

    python bench/gguf_load.py                       # the embedded model's GGUF
    python bench/gguf_load.py --model ~/.cache/loraplex/cpu-peer/1b/llama-1b-Q4_K_M.gguf

Per route: peak resident set of the process (ru_maxrss) and its resident set after the load, both less the
process's resident set before it (torch and transformers imported, kernels loaded), the model's resident weight
bytes (parameters, tied ones once) and the load's seconds. The float32-first route needs the safetensors copy
(converted once, on a first start: that conversion's own peak, the whole model in float32 twice, is not counted).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(route: str, model: str | None) -> None:
    """One load in this process; prints its figures as JSON."""
    import torch
    from transformers import AutoModelForCausalLM

    from server.config import Settings
    from server.models import converted_gguf_dir, embedded_gguf_path, gguf_cache_dir, load_base_model
    from server.native.loader import load_kernels
    from server.quant.gguf_weights import quantize_from_gguf

    load_kernels()
    settings = Settings(device="cpu", model=model, gguf_blocks="keep")
    gguf = Path(model) if model else embedded_gguf_path()
    target = gguf_cache_dir(gguf, settings.cache_dir) if model else settings.cache_dir / "models" / \
        "SmolLM2-135M-Instruct"
    folder = converted_gguf_dir(gguf, target) if route == "float32-first" else None
    before, start = _rss_bytes(), time.perf_counter()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if route == "direct":
        loaded = load_base_model(settings).model
    else:
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        quantize_from_gguf(loaded, gguf)
    seconds = time.perf_counter() - start
    params = {p.data_ptr(): p for p in loaded.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in params)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    file_weights = sum(int(t.n_bytes) for t in __import__("gguf").GGUFReader(str(gguf)).tensors)
    print(json.dumps({"route": route, "peak_rss": max(peak, peak_before) - before, "rss_after": _rss_bytes() - before,
                      "weights": weights, "file_weights": file_weights, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a GGUF file (default: the embedded model's)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.model)
    mib = 2**20
    print("| route | peak RSS over baseline (MiB) | RSS after load (MiB) | model weights (MiB) | GGUF weights (MiB) "
          "| load (s) |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for route in ("direct", "float32-first"):
        command = [sys.executable, __file__, "--child", route] + (["--model", args.model] if args.model else [])
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"| {route} | {r['peak_rss'] / mib:.0f} | {r['rss_after'] / mib:.0f} | {r['weights'] / mib:.1f} | "
              f"{r['file_weights'] / mib:.1f} | {r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
