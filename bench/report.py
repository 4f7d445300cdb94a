"""The benchmark report: bench/results/results.md and PNG plots, from whatever results exist.

    python bench/report.py

Reads (each optional):
  bench/results/throughput.json   bench/throughput.py -> table + throughput.png (systems side by side)
  bench/results/scaling.json      bench/scaling.py    -> table + scaling.png (ratio to one adapter and p99 vs count)
  bench/results/step.txt          stdout of `python bench/step.py --profile` -> step.png (per-step breakdown)
  bench/results/step-before.txt   the same at an earlier commit, shown beside it (optional)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SYSTEMS = {"engine_base": "loraplex, base only", "engine_multi": "loraplex, adapters",
           "engine_multi_bf16": "loraplex, adapters (bfloat16 slots)", "generate": "transformers generate",
           "peft": "PEFT mixed batch"}
COLORS = {"engine_base": "#4c72b0", "engine_multi": "#55a868", "engine_multi_bf16": "#8fbc8f", "generate": "#c44e52",
          "peft": "#8172b2"}


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def plot_throughput(data: dict) -> Path:
    """Grouped bars: output tok/s of each system per workload."""
    workloads = list(data["workloads"])
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(workloads)), 4.2))
    systems = {k: v for k, v in SYSTEMS.items() if all(k in data["workloads"][w] for w in workloads)}
    width = 0.8 / len(systems)
    for j, (key, label) in enumerate(systems.items()):
        values = [data["workloads"][w][key]["tok_s"] for w in workloads]
        xs = [i + (j - (len(systems) - 1) / 2) * width for i in range(len(workloads))]
        bars = ax.bar(xs, values, width, label=label, color=COLORS[key])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(workloads)), [workload_label(data["workloads"][w]["spec"]) for w in workloads],
                  fontsize=8)
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"Throughput on CPU ({data['meta']['model']}{', quick run' if data['meta']['quick'] else ''})")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save(fig, "throughput.png")


def workload_label(spec: dict) -> str:
    label = f"{spec['requests']} requests / {spec['adapters']} adapters"
    if spec.get("equal"):
        return label + "\nequal lengths"
    ranks = spec.get("ranks", [16])
    label += f"\nranks {min(ranks)}-{max(ranks)}" if len(ranks) > 1 else f"\nrank {ranks[0]}"
    return label + (", q/k/v/o" if spec.get("targets") else "")


def plot_scaling(data: dict) -> Path:
    """Two panels against adapter count (log x): throughput over the same engine's one-adapter run, and p99
    TTFT / ITL."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    cmap = plt.get_cmap("tab10")
    all_counts: set[int] = set()
    for k, (dist, by_count) in enumerate(data["runs"].items()):
        counts = sorted(by_count, key=int)
        xs = [int(c) for c in counts]
        all_counts.update(xs)
        color = cmap(k)
        left.plot(xs, [by_count[c]["ratio"] for c in counts], marker="o", color=color, label=dist)
        right.plot(xs, [by_count[c]["ttft_p99_ms"] for c in counts], marker="o", color=color,
                   label=f"TTFT p99, {dist}")
        right.plot(xs, [by_count[c]["itl_p99_ms"] for c in counts], marker="s", linestyle="--", color=color,
                   label=f"ITL p99, {dist}")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(sorted(all_counts), [str(c) for c in sorted(all_counts)])
        ax.minorticks_off()
        ax.set_xlabel("registered adapters")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    left.axhline(0.85, color="gray", linewidth=0.8, linestyle=":", label="target 0.85")
    left.legend(fontsize=7)
    left.set_ylabel("tok/s over the same requests on one adapter")
    left.set_ylim(0, 1.1)
    right.set_ylabel("milliseconds")
    right.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    right.yaxis.set_major_formatter(plain)
    right.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0)))
    right.yaxis.set_minor_formatter(plain)
    meta = data["meta"]
    pool = meta.get("capacity")
    device = (f"{pool['pool_bytes'] / 2**20:.0f} MiB adapter pool" if pool else f"{meta['max_loras']} device slots")
    fig.suptitle(f"Scaling with adapter count ({device}, {meta['max_cpu_loras']} in CPU "
                 f"tier{', quick run' if meta['quick'] else ''})", fontsize=10)
    return save(fig, "scaling.png")


PROFILED_STEPS = 3  # bench/step.py's profile() default: each table sums this many steps
_UNITS = {"s": 1e3, "ms": 1.0, "us": 1e-3, "ns": 1e-6}
_ROW = re.compile(r"^\s*(\S.*?)\s{2,}([\d.]+)%\s+([\d.]+)(ms|us|ns|s)\s")


def parse_step(text: str) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """`bench/step.py --profile` stdout -> ({variant: ms/step}, {profile title: {op: self ms}})."""
    steps = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(.+?): ([\d.]+) ms/step$", text, re.M)}
    profiles: dict[str, dict[str, float]] = {}
    current = None
    for line in text.splitlines():
        title = re.match(r"=== profile, (.+) ===", line)
        if title:
            current = profiles.setdefault(title.group(1), {})
            continue
        row = _ROW.match(line)
        if current is not None and row and not row.group(1).startswith("Name"):
            current[row.group(1)] = float(row.group(3)) * _UNITS[row.group(4)] / PROFILED_STEPS
    return steps, profiles


def plot_step(steps: dict[str, float], profiles: dict[str, dict[str, float]]) -> Path:
    """Stacked bars: self CPU time per op of each profiled variant (top ops, the rest as 'other')."""
    top = sorted({op for p in profiles.values() for op in p},
                 key=lambda op: -max(p.get(op, 0.0) for p in profiles.values()))[:8]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.8 * len(profiles)), 4))
    names = list(profiles)
    labels = [n.replace(", ", ",\n") for n in names]
    bottoms = [0.0] * len(names)
    cmap = plt.get_cmap("tab10")
    for k, op in enumerate([*top, "other"]):
        values = [profiles[n].get(op, 0.0) if op != "other" else
                  sum(v for o, v in profiles[n].items() if o not in top) for n in names]
        ax.bar(labels, values, bottom=bottoms, label=op, color=cmap(k % 10))
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set_ylabel("self CPU ms per step (torch profiler)")
    title = ", ".join(f"{k}: {v:.1f} ms/step" for k, v in steps.items())
    ax.set_title(f"Per-step breakdown (bench/step.py)\n{title}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save(fig, "step.png")


def save(fig, name: str) -> Path:
    path = RESULTS / name
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    parts = ["# loraplex benchmark results\n",
             "Written by `bench/report.py` from the JSON that `make bench` / `make bench-scaling` leave here.\n"]
    throughput, scaling = load("throughput.json"), load("scaling.json")
    step_txt, upload_md = RESULTS / "step.txt", RESULTS / "upload.md"
    if throughput:
        plot_throughput(throughput)
        parts += [(RESULTS / "throughput.md").read_text().replace("# Throughput", "## Throughput", 1),
                  "![throughput](throughput.png)\n"]
    if scaling:
        plot_scaling(scaling)
        parts += [(RESULTS / "scaling.md").read_text().replace("# Scaling", "## Scaling", 1),
                  "![scaling](scaling.png)\n"]
    if upload_md.is_file():
        parts.append(upload_md.read_text().replace("### ", "## ", 1))
    if step_txt.is_file():
        steps, profiles = parse_step(step_txt.read_text())
        before_txt = RESULTS / "step-before.txt"  # the same command at an earlier commit, if kept
        if before_txt.is_file():
            old_steps, old_profiles = parse_step(before_txt.read_text())
            steps = {**{f"before, {k}": v for k, v in old_steps.items()}, **steps}
            profiles = {**{f"before, {k}": v for k, v in old_profiles.items()}, **profiles}
        if profiles:
            plot_step(steps, profiles)
            parts += ["## One decode step (bench/step.py)\n",
                      "\n".join(f"- {k}: {v:.1f} ms/step" for k, v in steps.items()) + "\n", "![step](step.png)\n"]
    if len(parts) == 2:
        sys.exit("no results in bench/results: run bench/throughput.py or bench/scaling.py first")
    (RESULTS / "results.md").write_text("\n".join(parts))
    print(f"wrote {RESULTS / 'results.md'} and plots: "
          + ", ".join(sorted(p.name for p in RESULTS.glob("*.png"))))


if __name__ == "__main__":
    main()
