"""Upload to first token over HTTP: how soon a freshly uploaded adapter answers, on a real server.

    python bench/upload.py              # 20 uploads of rank-16 all-linear float32 adapters (19.5 MB each)
    python bench/upload.py --quick      # 4 uploads

Starts `loraplex serve` on 127.0.0.1 with an admin token and an empty store, then for each
adapter: a multipart upload (`POST /v1/adapters`, the two PEFT files), and as soon as it returns a
streamed completion on it (`max_tokens` 1). Timed per upload: the upload's round trip (streaming
the files, validation, hashing, the atomic store write), upload return to first token (the load
into the CPU tier and a device slot, then prefill), and the same completion again on the now
resident adapter, whose time to first token is the floor. p50 and p99 of each. The server runs
without prefix caching, so the repeated completion computes its prefill again and the difference
between the two is the load alone.
Writes bench/results/upload.md and upload.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, TARGET_SETS, percentile, write_json, write_random_adapter  # noqa: E402
from server.adapters.layout import BaseLayout  # noqa: E402
from server.config import Settings  # noqa: E402
from server.models import load_base_model  # noqa: E402
from tests.e2e.server_process import server_process  # noqa: E402

TOKEN = "bench-admin-token"
PROMPT = "Input: the parcel arrived two days late and the box was crushed\nOutput:"


def upload(client: httpx.Client, name: str, folder: Path) -> float:
    files = [(f, (f, (folder / f).open("rb"))) for f in ("adapter_config.json", "adapter_model.safetensors")]
    start = time.perf_counter()
    response = client.post("/v1/adapters", data={"name": name}, files=files)
    elapsed = time.perf_counter() - start
    for _, (_, handle) in files:
        handle.close()
    response.raise_for_status()
    return elapsed


def first_token(client: httpx.Client, model: str) -> float:
    """Seconds from sending a streamed completion to its first content chunk."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0, "stream": True}
    start = time.perf_counter()
    with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:])["choices"][0]["text"]:
                return time.perf_counter() - start
    raise RuntimeError(f"no token streamed for {model}")


def run(uploads: int, folder: Path, store: Path, base_name: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"upload": [], "to_first_token": [], "resident_ttft": []}
    env = {"LORAPLEX_ADMIN_TOKEN": TOKEN}
    with server_process("--adapters-dir", str(store), "--no-prefix-cache", env=env, timeout=600) as (_, url, _):
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=url, headers=headers, timeout=300) as client:
            first_token(client, base_name)  # warm the base path
            for i in range(uploads):
                name = f"up{i:03d}"
                times["upload"].append(upload(client, name, folder / name))
                times["to_first_token"].append(first_token(client, name))
                times["resident_ttft"].append(first_token(client, name))
                print(f"  {name}: upload {times['upload'][-1] * 1e3:.0f} ms, then first token "
                      f"{times['to_first_token'][-1] * 1e3:.0f} ms (resident {times['resident_ttft'][-1] * 1e3:.0f} ms)",
                      file=sys.stderr, flush=True)
    return times


def summary(times: dict[str, list[float]], adapter_mb: float) -> dict:
    ms = lambda xs, q: 1e3 * percentile(xs, q)  # noqa: E731
    total = [u + f for u, f in zip(times["upload"], times["to_first_token"])]
    extra = [f - r for f, r in zip(times["to_first_token"], times["resident_ttft"])]
    rows = {"upload": times["upload"], "upload return to first token": times["to_first_token"],
            "upload to first token": total, "resident adapter TTFT": times["resident_ttft"],
            "load cost (first token minus resident)": extra}
    return {"adapter_mb": adapter_mb, "uploads": len(total),
            "rows": {k: {"p50_ms": ms(v, 50), "p99_ms": ms(v, 99), "mean_ms": 1e3 * statistics.mean(v)}
                     for k, v in rows.items()}}


def render(result: dict) -> str:
    lines = [f"### Upload to first token over HTTP ({result['uploads']} uploads of {result['adapter_mb']:.1f} MB "
             "rank-16 all-linear float32 adapters)", "", "| | p50 ms | p99 ms |", "| --- | ---: | ---: |"]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.uploads = 4
    base = load_base_model(Settings(device="cpu"))
    layout, base_name = BaseLayout.from_model(base.model), base.name
    del base
    with tempfile.TemporaryDirectory() as tmp:
        folder, store = Path(tmp) / "adapters", Path(tmp) / "store"
        store.mkdir()
        size = 0
        for i in range(args.uploads):
            size = write_random_adapter(folder / f"up{i:03d}", layout, args.rank, TARGET_SETS["all"], seed=i)
        result = summary(run(args.uploads, folder, store, base_name), size / 1e6)
    text = render(result)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "upload.md").write_text(text)
    write_json("upload.json", result)


if __name__ == "__main__":
    main()
