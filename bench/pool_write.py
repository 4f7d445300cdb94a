"""One adapter written into the adapter pool, against a plain copy of the same bytes: what a cold adapter
costs the engine thread once its weights are parsed.

    python bench/pool_write.py                  # a rank-16 all-linear adapter of the default model
    python bench/pool_write.py --rank 64 --targets q_proj,v_proj

Times `LoraModel.write_slot` (every module's A and B into the adapter's extent, B scaled and transposed to
its rank-major block, the rank tables) over `--repeats` writes into alternating slots, and `copy_` of one
flat tensor of the same bytes into the pool (the floor). Writes bench/results/pool-write.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, TARGET_SETS, in_thread, write_random_adapter  # noqa: E402
from server.adapters.layout import BaseLayout  # noqa: E402
from server.adapters.peft_format import load_peft_adapter  # noqa: E402
from server.config import Settings  # noqa: E402
from server.lora.model import LoraModel  # noqa: E402
from server.models import load_base_model  # noqa: E402


def measure(rank: int, targets: tuple[str, ...], repeats: int) -> dict:
    base = load_base_model(Settings(device="cpu"))
    layout = BaseLayout.from_model(base.model)
    with tempfile.TemporaryDirectory() as tmp:
        nbytes = write_random_adapter(Path(tmp) / "a", layout, rank, targets, seed=0)
        adapter = load_peft_adapter(Path(tmp) / "a", layout, max(rank, 16))
    lora = LoraModel(base.model, layout, max_loras=4, max_rank=max(rank, 16))
    if lora.pool is None:
        raise SystemExit("the compiled CPU kernels are needed (the pool)")
    flat = torch.randn(nbytes // 4)
    writes, copies = [], []
    for i in range(repeats + 1):
        slot = i % 2
        lora.clear_slot(slot)
        start = time.perf_counter()
        lora.write_slot(slot, adapter)
        writes.append(time.perf_counter() - start)
        dst = lora.pool.data[2 * flat.numel():3 * flat.numel()]
        start = time.perf_counter()
        dst.copy_(flat)
        copies.append(time.perf_counter() - start)
    write, copy = statistics.median(writes[1:]), statistics.median(copies[1:])
    return {"rank": rank, "targets": list(targets), "bytes": nbytes, "write_ms": 1e3 * write, "copy_ms": 1e3 * copy,
            "write_gb_s": nbytes / write / 1e9, "copy_gb_s": nbytes / copy / 1e9, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default=",".join(TARGET_SETS["all"]))
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    r = in_thread(measure, args.rank, tuple(args.targets.split(",")), args.repeats)
    text = (f"# One adapter into the pool (rank {r['rank']}, {'/'.join(r['targets'])}, {r['bytes'] / 2**20:.1f} MiB, "
            f"{r['threads']} threads)\n\n| | ms (median) | GB/s |\n| --- | ---: | ---: |\n"
            f"| `write_slot` | {r['write_ms']:.2f} | {r['write_gb_s']:.1f} |\n"
            f"| plain copy of the same bytes | {r['copy_ms']:.2f} | {r['copy_gb_s']:.1f} |\n")
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pool-write.md").write_text(text)


if __name__ == "__main__":
    main()
