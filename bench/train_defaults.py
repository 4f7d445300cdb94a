"""Measure `loraplex train` settings on the shipped tasks with small data sets (docs/adapters.md's train defaults).

    python bench/train_defaults.py --tasks template sentiment --sizes 30 100 --lrs 1e-3 2e-3 4e-3

For each task, size and learning rate: train on `size` generated examples with early stopping on 30
other examples, then score greedy answers on 50 more (exact match). One JSON line per run on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import torch

from server.config import Settings
from server.models import load_base_model
from server.train.data import encode_all, pad_id_of, record_to_example
from server.train.evaluate import exact_match, generate_greedy, max_new_tokens_for
from server.train.tasks import TASKS, sentences
from server.train.trainer import TrainConfig, seed_everything, train, wrap_with_lora

TRAIN_SEED, STOP_SEED, TEST_SEED = 1234, 999, 4321


def run(task_name: str, size: int, config: TrainConfig, n_stop: int, n_test: int) -> dict:
    task = TASKS[task_name]
    base = load_base_model(Settings())  # fresh: PEFT wraps the model in place
    tokenizer = base.tokenizer
    records = task.examples(size, TRAIN_SEED)
    seen = frozenset(text for text, _ in sentences(size, TRAIN_SEED))
    stop = task.examples(n_stop, STOP_SEED, exclude=seen)
    seen |= frozenset(text for text, _ in sentences(n_stop, STOP_SEED, exclude=seen))
    test = task.examples(n_test, TEST_SEED, exclude=seen)
    to_examples = lambda rs: [record_to_example(r, tokenizer) for r in rs]  # noqa: E731
    train_set, _ = encode_all(to_examples(records), tokenizer, config.max_length)
    stop_set, _ = encode_all(to_examples(stop), tokenizer, config.max_length)
    seed_everything(config.seed)
    model = wrap_with_lora(base.model, config)
    stats = train(model, train_set, config, pad_id_of(tokenizer), progress=False, held_out=stop_set,
                  log=lambda line: print(f"  [{task_name} n={size} lr={config.lr:g}] {line}", file=sys.stderr))
    test_examples = to_examples(test)
    outputs = generate_greedy(model, tokenizer, test_examples, max_new_tokens_for(test_examples, tokenizer))
    accuracy = sum(exact_match(o, e.completion) for o, e in zip(outputs, test_examples)) / len(test_examples)
    return {"task": task_name, "examples": size, "lr": config.lr, "max_epochs": config.epochs,
            "warmup": config.warmup, "patience": config.patience, "epochs_run": len(stats.train_losses),
            "best_epoch": stats.best_epoch, "train_loss": round(stats.last_loss, 4),
            "held_out_loss": round(stats.held_out_loss, 4), "accuracy": accuracy, "train_seconds": round(stats.seconds)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["template", "sentiment"], choices=sorted(TASKS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[30, 100])
    parser.add_argument("--lrs", nargs="+", type=float, default=[TrainConfig().lr])
    parser.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    parser.add_argument("--warmup", type=float, default=TrainConfig().warmup)
    parser.add_argument("--patience", type=int, default=TrainConfig().patience)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stop-examples", type=int, default=30)
    parser.add_argument("--test-examples", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for task in args.tasks:
        for size in args.sizes:
            for lr in args.lrs:
                start = time.perf_counter()
                result = run(task, size, replace(TrainConfig(), lr=lr, epochs=args.epochs, warmup=args.warmup,
                                             patience=args.patience), args.stop_examples,
                             args.test_examples)
                result["seconds"] = round(time.perf_counter() - start)
                print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
