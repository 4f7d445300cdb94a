"""The `train` command: arguments and the run, shared by `loraplex train` and `python -m server.train`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from server.adapters.names import CONTRACT_FILE
from server.train.contract import contract_from_records, read_records
from server.train.data import IGNORE_INDEX, DataError, encode_all, load_jsonl, pad_id_of
from server.train.evaluate import EvalReport, evaluate
from server.train.trainer import (
    TrainConfig, TrainStats, default_threads, parse_targets, save_adapter, seed_everything, train, wrap_with_lora,
)

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


def prepare(args: argparse.Namespace):
    """Everything that can fail on bad input, before any training starts."""
    config = config_from_args(args)
    torch.set_num_threads(args.threads or default_threads())
    seed_everything(config.seed)
    base = load_base(args)
    train_set, dropped = encode_all(load_jsonl(args.data, base.tokenizer), base.tokenizer, config.max_length)
    if not train_set:
        raise DataError(f"{args.data}: no example fits in --max-length {config.max_length}")
    if dropped:
        print(f"train: skipped {dropped} examples longer than --max-length", file=sys.stderr)
    held_out = load_jsonl(args.eval, base.tokenizer) if args.eval else None
    return config, base, train_set, held_out


def card(base_name: str, config: TrainConfig, stats: TrainStats, report: EvalReport | None) -> str:
    """A short model card; it replaces PEFT's generic one, which names the local base folder."""
    targets = config.targets if isinstance(config.targets, str) else ", ".join(config.targets)
    lines = [
        f"# LoRA adapter for {base_name}", "",
        f"- LoRA: rank {config.rank}, alpha {config.alpha:g}, dropout {config.dropout:g}, targets: {targets}",
        f"- training: lr {config.lr:g}, {config.epochs} epoch(s), batch {config.batch_size}, seed {config.seed}, "
        f"{stats.steps} steps in {stats.seconds:.0f} s, loss {stats.first_loss:.4f} -> {stats.last_loss:.4f}",
    ]
    if report:
        lines.append(f"- held-out: exact match {report.accuracy:.1%} on {report.examples} examples, mean loss {report.mean_loss:.4f}")
    return "\n".join(lines) + "\n"


def run_train(args: argparse.Namespace) -> int:
    """Train one adapter; 0 on success, 2 on bad input, with the reason on stderr."""
    try:
        config, base, train_set, held_out = prepare(args)
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: ModelLoadError
        print(f"train: {exc}", file=sys.stderr)
        return 2
    model = wrap_with_lora(base.model, config)
    stats = train(model, train_set, config, pad_id_of(base.tokenizer), progress=not args.no_progress)
    save_adapter(model, args.output, base.name)
    print(f"saved {args.output} ({stats.steps} steps, {stats.seconds:.1f} s, loss {stats.first_loss:.4f} -> {stats.last_loss:.4f})")
    report = None
    if held_out:
        encoded, _ = encode_all(held_out, base.tokenizer, config.max_length)
        report = evaluate(model, base.tokenizer, held_out, encoded)
        print(json.dumps({"accuracy": report.accuracy, "mean_loss": report.mean_loss, "examples": report.examples}))
        if args.report:
            args.report.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    (args.output / "README.md").write_text(card(base.name, config, stats, report))
    longest = max((len(e.input_ids) - sum(label == IGNORE_INDEX for label in e.labels) for e in train_set), default=1)
    contract = contract_from_records(read_records(args.data), longest, f"LoRA adapter trained on {args.data.name}")
    (args.output / CONTRACT_FILE).write_bytes(contract.to_bytes())
    print(f"wrote {args.output / CONTRACT_FILE} (edit it, or PATCH /v1/adapters/<name>, to change the contract)")
    return 0
