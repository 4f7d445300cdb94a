"""The `train` command: arguments and the run, shared by `loraplex train` and `python -m server.train`."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from server.adapters.names import CONTRACT_FILE
from server.train.contract import contract_from_records, read_records
from server.train.data import IGNORE_INDEX, DataError, Encoded, encode_all, load_jsonl, pad_id_of
from server.train.evaluate import EvalReport, evaluate
from server.train.options import add_train_arguments, config_from_args  # noqa: F401 - the command's API
from server.train.trainer import (
    TrainConfig,
    TrainStats,
    default_threads,
    save_adapter,
    seed_everything,
    train,
    wrap_with_lora,
)

MIN_SPLIT = 20  # without --eval, data sets at least this large give a tenth to early stopping


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


def stopping_set(train_set: list[Encoded], held_out: list[Encoded] | None,
                 seed: int) -> tuple[list[Encoded], list[Encoded] | None]:
    """(training data, the set early stopping watches): --eval when given, else a tenth of 20+ examples."""
    if held_out or len(train_set) < MIN_SPLIT:
        return train_set, held_out or None
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed)).tolist()
    count = max(3, len(train_set) // 10)
    print(f"train: holding out {count} of {len(train_set)} examples for early stopping (no --eval given)",
          file=sys.stderr)
    return [train_set[i] for i in order[count:]], [train_set[i] for i in order[:count]]


def loss_text(stats: TrainStats) -> str:
    """The one loss figure, everywhere: mean per completion token, of the kept epoch."""
    text = f"train loss {stats.last_loss:.4f}"
    if stats.held_out_loss is not None:
        text += f", held-out loss {stats.held_out_loss:.4f}"
    return text


def epochs_text(stats: TrainStats) -> str:
    stop = ", stopped early" if stats.stopped_early else ""
    return f"{len(stats.train_losses)} of {stats.planned_epochs} epochs{stop}, kept epoch {stats.best_epoch}"


def card(base_name: str, config: TrainConfig, stats: TrainStats, report: EvalReport | None) -> str:
    """A short model card; it replaces PEFT's generic one, which names the local base folder."""
    targets = config.targets if isinstance(config.targets, str) else ", ".join(config.targets)
    lines = [
        f"# LoRA adapter for {base_name}", "",
        f"- LoRA: rank {config.rank}, alpha {config.alpha:g}, dropout {config.dropout:g}, targets: {targets}",
        f"- training: lr {config.lr:g} (warmup {config.warmup:g}, linear decay), batch {config.batch_size}, "
        f"seed {config.seed}; {epochs_text(stats)}; {stats.steps} steps in {stats.seconds:.0f} s",
        f"- loss (mean per completion token, EOS included): {loss_text(stats)}",
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
    encoded = encode_all(held_out, base.tokenizer, config.max_length)[0] if held_out else None
    train_set, watched = stopping_set(train_set, encoded, config.seed)
    model = wrap_with_lora(base.model, config)
    stats = train(model, train_set, config, pad_id_of(base.tokenizer), progress=not args.no_progress,
                  held_out=watched, log=lambda line: print(f"train: {line}", file=sys.stderr))
    save_adapter(model, args.output, base.name)
    print(f"saved {args.output} ({epochs_text(stats)}, {stats.steps} steps, {stats.seconds:.1f} s): {loss_text(stats)}")
    report = None
    if held_out:
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
