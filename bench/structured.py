"""Structured output's cost: the same workload with every sequence schema-constrained, and with none.

One engine (the default model, base only), one burst of requests sampled at temperature 1 over
three JSON schemas (prompts and seeds fixed). The constrained run goes first; each free request
then generates exactly as many tokens as its constrained twin did (`max_tokens` = that count,
EOS ignored), so both runs produce the same number of tokens from the same prompts in the same
batch shapes. Runs alternate (free, constrained, ...) and the best of each is kept, since the
machine is shared. Also reported: the time spent filling grammar masks, per step and per sequence.

Writes bench/results/structured.md and structured.json. `--quick`: 8 requests, one repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, start_engine, write_json  # noqa: E402
from server.config import Settings  # noqa: E402
from server.engine.request import GenerationRequest, OutputFormat, SamplingParams  # noqa: E402

SCHEMAS = {
    "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                                "city": {"type": "string", "maxLength": 24}},
               "required": ["name", "age", "city"], "additionalProperties": False},
    "order": {"type": "object", "properties": {"items": {"type": "array", "maxItems": 4,
                                                         "items": {"enum": ["apple", "pear", "plum", "fig"]}},
                                               "paid": {"type": "boolean"},
                                               "note": {"type": "string", "maxLength": 40}},
              "required": ["items", "paid", "note"], "additionalProperties": False},
    "rating": {"type": "object", "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5},
                                                "mood": {"enum": ["positive", "negative", "mixed"]}},
               "required": ["stars", "mood"], "additionalProperties": False},
}


def workload(n: int) -> list[tuple[str, str, int]]:
    """(prompt, schema name, seed) per request."""
    names = list(SCHEMAS)
    return [(f"Record {i} as a JSON object ({names[i % len(names)]}):", names[i % len(names)], 1000 + i)
            for i in range(n)]


async def burst(engine, requests: list[GenerationRequest]) -> tuple[float, list]:
    start = time.perf_counter()
    streams = [(await engine.submit(r))[0] for r in requests]
    results = await asyncio.gather(*(s.collect() for s in streams))
    return time.perf_counter() - start, results


def constrained_requests(work, max_tokens: int, tag: str) -> list[GenerationRequest]:
    return [GenerationRequest(f"{tag}-{i}", "SmolLM2-135M-Instruct", prompt, SamplingParams(
        max_tokens=max_tokens, temperature=1.0, seed=seed,
        response_format=OutputFormat("json_schema", json.dumps(SCHEMAS[name]), name)))
        for i, (prompt, name, seed) in enumerate(work)]


def free_requests(work, lengths: list[int], tag: str) -> list[GenerationRequest]:
    return [GenerationRequest(f"{tag}-{i}", "SmolLM2-135M-Instruct", prompt, SamplingParams(
        max_tokens=length, temperature=1.0, seed=seed, ignore_eos=True))
        for i, ((prompt, _, seed), length) in enumerate(zip(work, lengths))]


class MaskTimer:
    """Wraps the engine's `fill_masks` to add up its time, steps and rows."""

    def __init__(self, grammars) -> None:
        self.inner, self.seconds, self.calls, self.rows = grammars.fill_masks, 0.0, 0, 0
        grammars.fill_masks = self

    def __call__(self, constraints):
        start = time.perf_counter()
        try:
            return self.inner(constraints)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1
            self.rows += len(constraints)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.repeats = 8, 1
    work = workload(args.requests)
    with tempfile.TemporaryDirectory() as store:
        engine = start_engine(Settings(device="cpu", adapters_dir=Path(store)))
        try:
            timer = MaskTimer(engine.grammars)
            asyncio.run(burst(engine, constrained_requests(work[:3], 8, "warm")))  # compile the schemas
            asyncio.run(burst(engine, free_requests(work[:3], [8] * 3, "warm-free")))
            print("warmed up", file=sys.stderr, flush=True)
            timer.seconds = timer.calls = timer.rows = 0
            constrained_s, free_s, lengths, valid = [], [], None, 0
            for r in range(args.repeats):
                seconds, results = asyncio.run(burst(engine, constrained_requests(work, args.max_tokens, f"c{r}")))
                constrained_s.append(seconds)
                lengths = lengths or [res.completion_tokens for res in results]
                valid = sum(_valid(res.text) for res in results)
                seconds, _ = asyncio.run(burst(engine, free_requests(work, lengths, f"f{r}")))
                free_s.append(seconds)
                print(f"repeat {r + 1}: constrained {constrained_s[-1]:.1f} s, free {free_s[-1]:.1f} s",
                      file=sys.stderr, flush=True)
            mask = {"seconds": timer.seconds, "steps": timer.calls, "rows": timer.rows}
        finally:
            engine.stop()
    tokens = sum(lengths)
    row = {"requests": len(work), "tokens": tokens, "free_s": min(free_s), "constrained_s": min(constrained_s),
           "free_tok_s": tokens / min(free_s), "constrained_tok_s": tokens / min(constrained_s),
           "ratio": min(free_s) / min(constrained_s), "valid_json": valid, "repeats": args.repeats,
           "mask_ms_per_step": 1e3 * mask["seconds"] / max(1, mask["steps"]),
           "mask_us_per_sequence": 1e6 * mask["seconds"] / max(1, mask["rows"]),
           "mask_share": mask["seconds"] / max(1e-9, sum(constrained_s))}
    write_json("structured.json", row)
    text = render(row)
    (RESULTS / "structured.md").write_text(text)
    print(text)


def _valid(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def render(row: dict) -> str:
    return (f"# Structured output: every sequence constrained vs none\n\n"
            f"{row['requests']} requests, {row['tokens']} generated tokens each run, temperature 1, "
            f"3 JSON schemas; best of {row['repeats']}.\n\n"
            "| run | seconds | output tok/s |\n| --- | ---: | ---: |\n"
            f"| free (same token counts, EOS ignored) | {row['free_s']:.1f} | {row['free_tok_s']:.1f} |\n"
            f"| every sequence schema-constrained | {row['constrained_s']:.1f} | {row['constrained_tok_s']:.1f} |\n\n"
            f"Constrained / free throughput: **{row['ratio']:.2f}** (target >= 0.85). "
            f"Outputs that parse as JSON: {row['valid_json']}/{row['requests']}. "
            f"Mask filling: {row['mask_ms_per_step']:.2f} ms per step, {row['mask_us_per_sequence']:.1f} us per "
            f"sequence, {100 * row['mask_share']:.1f}% of the constrained runs' time.\n")


if __name__ == "__main__":
    main()
