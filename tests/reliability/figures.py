"""Each suite's figures: printed (pytest -s shows them) and written to results/<suite>.json.

docs/reliability.md quotes these files from the last full run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def record(suite: str, form: str, figures: dict) -> dict:
    """Print and save one suite's figures; returns what was written."""
    RESULTS.mkdir(exist_ok=True)
    entry = {"suite": suite, "form": form, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             **figures}
    text = json.dumps(entry, indent=2, sort_keys=False, default=str)
    (RESULTS / f"{suite}-{form}.json").write_text(text + "\n")
    print(f"\n[reliability] {suite} ({form}): {json.dumps(figures, default=str)}")
    return entry


def mib(n: int) -> float:
    return round(n / 2**20, 1)
