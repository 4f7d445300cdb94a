"""Score the base model and every adapter of a loraplex server with lm-evaluation-harness, over the API.

    python eval/score.py                      # start `loraplex serve` on adapters/, score everything, stop it
    python eval/score.py --url http://localhost:8000 --models my-adapter   # a running server, one adapter
    python eval/score.py --compare-hf         # also run lm-eval's own `hf` model (+ `peft=`) and compare

lm-eval is a real client here: its `local-completions` model (token-id prompts, echo + logprobs for
loglikelihoods) and, for generation tasks, `local-chat-completions`. Tasks are the YAML files of
eval/tasks (local data, no dataset hub). With `--compare-hf`, every model is scored again by lm-eval's
`hf` model on the server's own base folder (`root` of the base in /v1/models) and adapter folders, and
the per-example loglikelihoods and generations are compared.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TASKS_DIR = ROOT / "eval" / "tasks"
DEFAULT_TASKS = ("loraplex_sentiment", "loraplex_template")
CHAT_SUFFIX = " (chat)"

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local data files only: never a dataset hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class Scores:
    """One model's run: metric per task, and each example's responses (loglikelihoods or texts) per task."""

    metrics: dict[str, float] = field(default_factory=dict)
    examples: dict[str, dict[int, list]] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class Served:
    """What /v1/models says: the base model's name and folder, each adapter's folder, in load order."""

    base: str
    base_root: str
    adapters: dict[str, str]


def served(url: str, api_key: str | None) -> Served:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    data = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).raise_for_status().json()["data"]
    base = next(m for m in data if m.get("parent") is None)
    return Served(base["id"], base["root"], {m["id"]: m["root"] for m in data if m.get("parent") is not None})


def _task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def _scores(results: dict, started: float) -> Scores:
    out = Scores(seconds=time.perf_counter() - started)
    for task, metrics in results["results"].items():
        value = next(v for k, v in metrics.items() if "," in k and not k.split(",")[0].endswith("_stderr"))
        out.metrics[task] = float(value)
    for task, samples in results.get("samples", {}).items():
        out.examples[task] = {s["doc_id"]: [r[0] for r in s["resps"]] for s in samples}
    return out


def run_lm_eval(model: str, model_args: dict, tasks: list[str], limit: int | None, chat: bool = False) -> Scores:
    import lm_eval

    started = time.perf_counter()
    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, limit=limit,
                                      batch_size=8, log_samples=True, task_manager=_task_manager(),
                                      apply_chat_template=chat, bootstrap_iters=0, verbosity="WARNING")
    return _scores(results, started)


def api_scores(url: str, model: str, tokenizer: str, tasks: list[str], limit: int | None,
               chat: bool = False) -> Scores:
    """lm-eval against the server: token-id prompts (lm-eval's default) with `local-completions`; with
    `chat`, messages with `local-chat-completions` (generation tasks only, as lm-eval allows)."""
    args = {"model": model, "tokenizer": tokenizer, "tokenizer_backend": "huggingface", "max_retries": 1,
            "num_concurrent": 1, "timeout": 600}
    if chat:
        args.update(base_url=f"{url}/v1/chat/completions", tokenized_requests=False)
        return run_lm_eval("local-chat-completions", args, tasks, limit, chat=True)
    args.update(base_url=f"{url}/v1/completions", tokenized_requests=True)
    return run_lm_eval("local-completions", args, tasks, limit)


def hf_scores(base_root: str, adapter_root: str | None, tasks: list[str], limit: int | None,
              chat: bool = False) -> Scores:
    """lm-eval's own `hf` model on the same base folder, with the adapter through `peft=`."""
    args = {"pretrained": base_root, "dtype": "float32", "device": "cpu"}
    if adapter_root is not None:
        args["peft"] = adapter_root
    return run_lm_eval("hf", args, tasks, limit, chat=chat)


def compare(api: Scores, ref: Scores) -> tuple[float, int, int]:
    """(largest |loglikelihood difference|, generations that differ, generations compared)."""
    worst, differ, total = 0.0, 0, 0
    for task, docs in api.examples.items():
        for doc_id, responses in docs.items():
            for a, b in zip(responses, ref.examples[task][doc_id], strict=True):
                if isinstance(a, str):
                    total += 1
                    differ += a != b
                else:
                    worst = max(worst, abs(float(a[0]) - float(b[0])))
    return worst, differ, total


def table(rows: dict[str, Scores], tasks: list[str], extra: dict[str, str] | None = None) -> str:
    """A Markdown table: one row per model, one column per task (accuracy or exact match)."""
    header = ["model", *tasks, "seconds"] + (["vs hf+peft"] if extra else [])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, s in rows.items():
        cells = [name, *(f"{s.metrics[t]:.3f}" if t in s.metrics else "-" for t in tasks), f"{s.seconds:.0f}"]
        lines.append("| " + " | ".join(cells + ([extra.get(name, "")] if extra else [])) + " |")
    return "\n".join(lines)


def generation_tasks(tasks: list[str]) -> list[str]:
    import yaml

    return [t for t in tasks if yaml.safe_load((TASKS_DIR / f"{t}.yaml").read_text())["output_type"] == "generate_until"]


def score_all(url: str, args: argparse.Namespace) -> str:
    info = served(url, os.environ.get("OPENAI_API_KEY"))
    names = args.models or [info.base, *info.adapters]
    tasks = list(args.tasks)
    rows: dict[str, Scores] = {}
    notes: dict[str, str] = {}
    chat_tasks = generation_tasks(tasks) if args.chat else []
    for name in names:
        print(f"scoring {name} ...", file=sys.stderr, flush=True)
        rows[name] = api_scores(url, name, info.base_root, tasks, args.limit)
        if chat_tasks:
            rows[name + CHAT_SUFFIX] = api_scores(url, name, info.base_root, chat_tasks, args.limit, chat=True)
        if args.compare_hf:
            notes.update(_compare_hf(name, info, tasks, chat_tasks, args.limit, rows))
        print(table(rows, tasks, notes if args.compare_hf else None).splitlines()[-1], file=sys.stderr, flush=True)
    return table(rows, tasks, notes if args.compare_hf else None)


def _compare_hf(name: str, info: Served, tasks: list[str], chat_tasks: list[str], limit: int | None,
                rows: dict[str, Scores]) -> dict[str, str]:
    adapter = info.adapters.get(name)
    notes = {}
    for suffix, task_list, chat in (("", tasks, False), (CHAT_SUFFIX, chat_tasks, True)):
        if not task_list:
            continue
        ref = hf_scores(info.base_root, adapter, task_list, limit, chat=chat)
        worst, differ, total = compare(rows[name + suffix], ref)
        same = all(abs(rows[name + suffix].metrics[t] - ref.metrics[t]) < 1e-9 for t in task_list)
        notes[name + suffix] = (f"max loglikelihood diff {worst:.1e}; generations differing {differ}/{total}; "
                                f"metrics {'equal' if same else 'DIFFERENT'}")
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start `loraplex serve` on --adapters-dir)")
    parser.add_argument("--adapters-dir", default=str(ROOT / "adapters"), help="the store of the server started")
    parser.add_argument("--models", nargs="*", help="model names to score (default: the base and every adapter)")
    parser.add_argument("--tasks", nargs="*", default=list(DEFAULT_TASKS), help="task names in eval/tasks")
    parser.add_argument("--limit", type=int, help="score only the first N examples of each task")
    parser.add_argument("--chat", action="store_true", help="also run the generation tasks through chat")
    parser.add_argument("--compare-hf", action="store_true", help="also run lm-eval's hf model (+ peft) and compare")
    parser.add_argument("--serve-flags", default="", help="extra flags of the server started (space-separated)")
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        url = args.url
        if url is None:
            from tests.e2e.server_process import running_server

            url = stack.enter_context(running_server("--adapters-dir", args.adapters_dir, *args.serve_flags.split()))
        started = time.perf_counter()
        print(score_all(url.rstrip("/"), args))
        print(f"\n{time.perf_counter() - started:.0f} s in all", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
