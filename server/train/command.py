"""The `train` command: arguments and the run, shared by `loraplex train` and `python -m server.train`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from server.train.data import DataError, encode_all, load_jsonl, pad_id_of
from server.train.evaluate import evaluate
from server.train.trainer import TrainConfig, default_threads, parse_targets, save_adapter, seed_everything, train, wrap_with_lora

DEFAULTS = TrainConfig()


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, help='training JSONL: {"prompt", "completion"} or {"messages": [...]} per line')
    parser.add_argument("--output", "-o", type=Path, required=True, help="folder for the PEFT adapter")
    parser.add_argument("--eval", type=Path, default=None, help="held-out JSONL: report exact-match accuracy and mean loss")
    parser.add_argument("--report", type=Path, default=None, help="also write the held-out report as JSON here")
    parser.add_argument("--rank", type=int, default=DEFAULTS.rank, help="LoRA rank r (default %(default)s)")
    parser.add_argument("--alpha", type=float, default=DEFAULTS.alpha, help="LoRA alpha (default %(default)s)")
    parser.add_argument("--targets", default="all-linear", help="comma-separated module names, or all-linear (default)")
    parser.add_argument("--dropout", type=float, default=DEFAULTS.dropout, help="LoRA dropout (default %(default)s)")
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr, help="peak learning rate (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs, help="default %(default)s")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="default %(default)s")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="default %(default)s")
    parser.add_argument("--max-length", type=int, default=DEFAULTS.max_length, help="tokens per example (default %(default)s)")
    parser.add_argument("--model", default=None, help="local base model folder (default: the embedded default model)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the server's setting, auto)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: the idle cores, at least 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    for name in ("rank", "epochs", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr <= 0 or args.alpha <= 0:
        raise ValueError("--lr and --alpha must be positive")
    return TrainConfig(
        rank=args.rank, alpha=args.alpha, targets=parse_targets(args.targets), dropout=args.dropout,
        lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, max_length=args.max_length,
    )


def load_base(args: argparse.Namespace):
    # Imported here so that `--help` stays fast and free of model-loading imports.
    from server.config import Settings
    from server.models import load_base_model

    # Only flags given on the command line override the LORAPLEX_* environment.
    given = {key: value for key, value in (("model", args.model), ("device", args.device)) if value is not None}
    return load_base_model(Settings(**given))


def run_train(args: argparse.Namespace) -> int:
    """Train one adapter; 0 on success, 2 on bad input, with the reason on stderr."""
    try:
        config = config_from_args(args)
        torch.set_num_threads(args.threads or default_threads())
        seed_everything(config.seed)
        base = load_base(args)
        tokenizer = base.tokenizer
        train_set, dropped = encode_all(load_jsonl(args.data, tokenizer), tokenizer, config.max_length)
        if not train_set:
            raise DataError(f"{args.data}: no example fits in --max-length {config.max_length}")
        held_out = load_jsonl(args.eval, tokenizer) if args.eval else None
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: ModelLoadError
        print(f"train: {exc}", file=sys.stderr)
        return 2
    if dropped:
        print(f"train: skipped {dropped} examples longer than --max-length", file=sys.stderr)
    model = wrap_with_lora(base.model, config)
    stats = train(model, train_set, config, pad_id_of(tokenizer), progress=not args.no_progress)
    save_adapter(model, args.output, base.name)
    print(f"saved {args.output} ({stats.steps} steps, {stats.seconds:.1f} s, loss {stats.first_loss:.4f} -> {stats.last_loss:.4f})")
    if held_out:
        encoded, _ = encode_all(held_out, tokenizer, config.max_length)
        report = evaluate(model, tokenizer, held_out, encoded)
        print(json.dumps({"accuracy": report.accuracy, "mean_loss": report.mean_loss, "examples": report.examples}))
        if args.report:
            args.report.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return 0
