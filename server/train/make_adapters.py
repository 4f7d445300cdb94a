"""Rebuild the demo adapters in `adapters/`: `python -m server.train.make_adapters [--only NAME]`.

For each task of `server.train.tasks`: generate data with fixed seeds, train a LoRA adapter on
the default base model, score the base alone and the adapter on the same held-out prompts, and
write `adapters/<name>/` (PEFT files + a model card). Deterministic up to floating-point noise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from server.adapters.names import CONTRACT_FILE
from server.config import Settings
from server.models import BaseModel, load_base_model
from server.train.data import Example, encode_all, pad_id_of, record_to_example
from server.train.evaluate import exact_match, generate_greedy, max_new_tokens_for, mean_loss
from server.train.tasks import PROMPT_TEMPLATE, TASKS, Task, sentences
from server.train.trainer import (
    TrainConfig,
    TrainStats,
    default_threads,
    parse_targets,
    save_adapter,
    seed_everything,
    train,
    wrap_with_lora,
)

TRAIN_SEED, HELDOUT_SEED = 1234, 4321
TRAIN_EXAMPLES, HELDOUT_EXAMPLES = 320, 200


def _config(targets: str | list[str], lr: float = 2e-3) -> TrainConfig:
    return TrainConfig(rank=8, alpha=16, targets=targets, lr=lr, epochs=1, batch_size=8, seed=0, max_length=96,
                       warmup=0.05)


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Tuned on 2 shared CPU cores, one epoch each. Copying fields and one-word labels need only the
# attention projections (100%); capitalising every word needs the MLPs too (54% without them,
# 93% with them at lr 2e-3, 99.5% at 4e-3).
CONFIGS: dict[str, TrainConfig] = {
    "extract-json": _config(ATTENTION),
    "sentiment": _config(ATTENTION),
    "shout": _config("all-linear", lr=4e-3),
    "template": _config(ATTENTION),
}


@dataclass
class Score:
    exact: float  # exact match with the reference, whitespace normalised
    checked: float  # share of outputs the task's checker accepts
    loss: float | None = None


@dataclass
class Result:
    task: Task
    config: TrainConfig
    stats: TrainStats
    base: Score
    adapter: Score
    samples: list[tuple[str, str, str]]  # prompt, base output, adapter output
    size_bytes: int


def score(task: Task, held_out: list[dict], outputs: list[str]) -> Score:
    exact = sum(exact_match(o, r["completion"]) for o, r in zip(outputs, held_out)) / len(held_out)
    checked = sum(task.check(r["prompt"], o) for o, r in zip(outputs, held_out)) / len(held_out)
    return Score(exact, checked)


def held_out_for(task: Task, train_texts: frozenset[str], n: int) -> list[dict]:
    return task.examples(n, HELDOUT_SEED, exclude=train_texts)


def base_outputs(base: BaseModel, prompts: list[Example], max_new_tokens: int) -> list[str]:
    """The base's greedy answers, once: the prompt is the same for every task."""
    return generate_greedy(base.model, base.tokenizer, prompts, max_new_tokens)


def build(task: Task, config: TrainConfig, base_out: list[str], train_texts: frozenset[str],
          n_train: int, n_held: int, staging: Path) -> Result:
    """Train one adapter into `staging` and score it against the base."""
    base = load_base_model(Settings())  # fresh: PEFT wraps the model in place
    tokenizer = base.tokenizer
    records, held_out = task.examples(n_train, TRAIN_SEED), held_out_for(task, train_texts, n_held)
    examples = [record_to_example(r, tokenizer) for r in records]
    held_examples = [record_to_example(r, tokenizer) for r in held_out]
    train_set, _ = encode_all(examples, tokenizer, config.max_length)
    held_set, _ = encode_all(held_examples, tokenizer, config.max_length)
    base_score = score(task, held_out, base_out)
    seed_everything(config.seed)
    model = wrap_with_lora(base.model, config)
    print(f"[{task.name}] training on {len(train_set)} examples", file=sys.stderr)
    stats = train(model, train_set, config, pad_id_of(tokenizer))
    save_adapter(model, staging, base.name)
    outputs = generate_greedy(model, tokenizer, held_examples, max_new_tokens_for(held_examples, tokenizer))
    adapter_score = score(task, held_out, outputs)
    adapter_score.loss = mean_loss(model, held_set, pad_id_of(tokenizer))
    samples = [(r["prompt"], b, a) for r, b, a in list(zip(held_out, base_out, outputs))[:3]]
    size = (staging / "adapter_model.safetensors").stat().st_size
    return Result(task, config, stats, base_score, adapter_score, samples, size)


def cell(text: str) -> str:
    """Text as a Markdown table cell: one line, pipes escaped, empty made visible."""
    text = text.strip().replace("\n", "\\n").replace("|", "\\|")
    return f"`{text}`" if text else "(nothing)"


def card(result: Result, n_train: int, n_held: int) -> str:
    """The model card: what the adapter does, how it was made, how well it does."""
    c, s, task = result.config, result.stats, result.task
    targets = c.targets if isinstance(c.targets, str) else ", ".join(c.targets)
    rows = "\n".join(
        f"| {cell(p.splitlines()[0].removeprefix('Input: '))} | {cell(b[:60])} | {cell(a)} |" for p, b, a in result.samples
    )
    return f"""# {task.name}

LoRA adapter for SmolLM2-135M-Instruct (the loraplex default base model).

**Task**: {task.description}.

**Prompt** (the same for every demo adapter; the adapter alone decides the task), completion after `Output:`:

```
{PROMPT_TEMPLATE.format(text="Maria, 34, from Lisbon thinks the new phone is wonderful.")}
```

## Held-out score ({n_held} generated examples, none seen in training, greedy decoding)

| model | exact match | checker accepts |
|---|---|---|
| base model alone | {result.base.exact:.1%} | {result.base.checked:.1%} |
| base + this adapter | {result.adapter.exact:.1%} | {result.adapter.checked:.1%} |

Mean held-out loss of the adapter per completion token (EOS included): {result.adapter.loss:.3f}.

## Examples (held-out)

| input | base alone | with adapter |
|---|---|---|
{rows}

## Training

- data: {n_train} examples generated by `server.train.tasks` (seed {TRAIN_SEED}; held-out seed {HELDOUT_SEED}),
  sentences like the one above from a small grammar of names, ages, cities, products and opinions;
  loss on the completion and its EOS only
- LoRA: rank {c.rank}, alpha {c.alpha:g}, dropout {c.dropout:g}, targets: {targets}
  ({s.trainable_params:,} parameters, {result.size_bytes / 1e6:.1f} MB of safetensors)
- optimiser: AdamW, lr {c.lr:g} (linear warmup and decay), {c.epochs} epoch(s), batch {c.batch_size}, seed {c.seed}
- training time: {s.seconds:.0f} s wall-clock on {torch.get_num_threads()} CPU thread(s) of a shared 2-core machine ({s.steps} steps, mean training loss of the last epoch {s.last_loss:.3f} per completion token)

Reproduce: `python -m server.train.make_adapters --only {task.name}`
"""


def install(staging: Path, target: Path) -> None:
    """Swap the new folder in with renames, so a reader never sees a half-written adapter."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    contract = target / CONTRACT_FILE  # the hand-written contract (template, schema) outlives retraining
    if contract.is_file() and not (staging / CONTRACT_FILE).exists():
        shutil.copyfile(contract, staging / CONTRACT_FILE)
    if target.exists():
        os.replace(target, old)
    # mkdtemp makes a private folder; the store is read by the server, perhaps as another user.
    staging.chmod(0o755)
    for path in staging.iterdir():
        path.chmod(0o644)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def tuned(config: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """The task's config with any command-line overrides."""
    changes = {key: getattr(args, key) for key in ("epochs", "lr", "targets") if getattr(args, key) is not None}
    if args.rank is not None:
        changes.update(rank=args.rank, alpha=2.0 * args.rank)
    return replace(config, **changes)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m server.train.make_adapters", description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(TASKS), help="build only this task (repeatable)")
    parser.add_argument("--output", type=Path, default=Path("adapters"), help="adapter store (default %(default)s)")
    parser.add_argument("--train-examples", type=int, default=TRAIN_EXAMPLES)
    parser.add_argument("--heldout-examples", type=int, default=HELDOUT_EXAMPLES)
    parser.add_argument("--epochs", type=int, help="override the tuned epochs (for tuning)")
    parser.add_argument("--lr", type=float, help="override the tuned learning rate (for tuning)")
    parser.add_argument("--rank", type=int, help="override the tuned rank; alpha stays 2 x rank (for tuning)")
    parser.add_argument("--targets", type=parse_targets, help="override the tuned target modules (for tuning)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the idle cores, at least 1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or default_threads())
    print(f"using {torch.get_num_threads()} CPU thread(s)", file=sys.stderr)
    names = args.only or list(TASKS)
    train_texts = frozenset(text for text, _ in sentences(args.train_examples, TRAIN_SEED))
    started = time.perf_counter()
    base = load_base_model(Settings())
    # Every task has the same held-out prompts; the base's answers are generated once, as long as the longest reference.
    held = {name: [record_to_example(r, base.tokenizer) for r in held_out_for(TASKS[name], train_texts, args.heldout_examples)]
            for name in names}
    longest = max(max_new_tokens_for(examples, base.tokenizer) for examples in held.values())
    base_out = base_outputs(base, held[names[0]], longest)
    print(f"base model answered {len(base_out)} held-out prompts in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    del base
    args.output.mkdir(parents=True, exist_ok=True)
    for name in names:
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=args.output))
        try:
            result = build(TASKS[name], tuned(CONFIGS[name], args), base_out, train_texts, args.train_examples,
                           args.heldout_examples, staging)
            (staging / "README.md").write_text(card(result, args.train_examples, args.heldout_examples))
            install(staging, args.output / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        print(f"{name}: base {result.base.exact:.1%} -> adapter {result.adapter.exact:.1%} exact match "
              f"(checker {result.adapter.checked:.1%}), trained in {result.stats.seconds:.0f} s", flush=True)
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
