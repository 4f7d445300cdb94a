"""Training settings and the `loraplex train` arguments, without torch: `loraplex --help` stays fast."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TrainConfig:
    """Defaults measured on the shipped tasks at 30 and 100 examples (see docs/adapters.md, `loraplex train`)."""

    rank: int = 8
    alpha: float = 16.0
    targets: str | list[str] = "all-linear"
    dropout: float = 0.0
    lr: float = 1e-3
    epochs: int = 4  # at most; the learning rate decays to 0 over them (small data sets overfit beyond)
    batch_size: int = 8
    seed: int = 0
    max_length: int = 256
    warmup: float = 0.1  # fraction of the planned steps spent warming up the learning rate
    patience: int = 1  # epochs without a better held-out loss before training stops
    min_delta: float = 1e-3  # a held-out loss lower by less than this (per token) is no improvement


def parse_targets(text: str) -> str | list[str]:
    """`all-linear` stays PEFT's keyword; anything else is a comma-separated module list."""
    text = text.strip()
    if text == "all-linear":
        return text
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("--targets must name at least one module")
    return names


DEFAULTS = TrainConfig()


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, help='training JSONL: {"prompt", "completion"} or {"messages": [...]} per line')
    parser.add_argument("--output", "-o", type=Path, required=True, help="folder for the PEFT adapter")
    parser.add_argument("--eval", type=Path, default=None, help="held-out JSONL: early stopping on its loss, then "
                        "exact-match accuracy; without it a tenth of the data (20+ examples) is held out for stopping")
    parser.add_argument("--report", type=Path, default=None, help="also write the held-out report as JSON here")
    parser.add_argument("--rank", type=int, default=DEFAULTS.rank, help="LoRA rank r (default %(default)s)")
    parser.add_argument("--alpha", type=float, default=DEFAULTS.alpha, help="LoRA alpha (default %(default)s)")
    parser.add_argument("--targets", default="all-linear", help="comma-separated module names, or all-linear (default)")
    parser.add_argument("--dropout", type=float, default=DEFAULTS.dropout, help="LoRA dropout (default %(default)s)")
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr, help="peak learning rate (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs, help="at most this many epochs; early "
                        "stopping usually ends sooner (default %(default)s)")
    parser.add_argument("--patience", type=int, default=DEFAULTS.patience, help="epochs without a lower held-out "
                        "loss before stopping (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="default %(default)s")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="default %(default)s")
    parser.add_argument("--max-length", type=int, default=DEFAULTS.max_length, help="tokens per example (default %(default)s)")
    parser.add_argument("--model", default=None, help="local base model folder (default: the embedded default model)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the server's setting, auto)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: the idle cores, at least 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    for name in ("rank", "epochs", "batch_size", "max_length", "patience"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr <= 0 or args.alpha <= 0:
        raise ValueError("--lr and --alpha must be positive")
    return TrainConfig(
        rank=args.rank, alpha=args.alpha, targets=parse_targets(args.targets), dropout=args.dropout,
        lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, max_length=args.max_length,
        patience=args.patience,
    )
