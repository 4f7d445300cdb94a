"""The training loop: PEFT LoRA on a frozen base, AdamW, linear warmup and decay, early stopping on the
held-out loss. No Trainer."""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm import tqdm
from transformers import PreTrainedModel

from server.train.data import IGNORE_INDEX, Encoded, collate
from server.train.evaluate import mean_loss
from server.train.options import TrainConfig, parse_targets  # noqa: F401 - re-exported


@dataclass
class TrainStats:
    """Every loss here is one figure: the mean cross-entropy per completion token (EOS included),
    over a whole epoch for training, over the held-out set after an epoch."""

    steps: int
    seconds: float
    train_losses: list[float]  # per epoch run
    held_out_losses: list[float]  # per epoch run; empty without a held-out set
    best_epoch: int  # 1-based; the weights kept are this epoch's
    trainable_params: int
    planned_epochs: int

    @property
    def first_loss(self) -> float:
        return self.train_losses[0] if self.train_losses else math.nan

    @property
    def last_loss(self) -> float:
        """The training loss of the epoch whose weights were kept."""
        return self.train_losses[self.best_epoch - 1] if self.train_losses else math.nan

    @property
    def held_out_loss(self) -> float | None:
        return self.held_out_losses[self.best_epoch - 1] if self.held_out_losses else None

    @property
    def stopped_early(self) -> bool:
        return len(self.train_losses) < self.planned_epochs


def default_threads() -> int:
    """Cores not already busy, at least one. On a shared CPU, more torch threads than free cores
    make every small matmul wait at a barrier: decoding was 15x slower with 2 threads than with 1."""
    cores = os.cpu_count() or 1
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(cores, cores - busy))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def wrap_with_lora(model: PreTrainedModel, config: TrainConfig) -> PeftModel:
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,  # type: ignore[arg-type]  # typed int by PEFT, used as a float scale
        target_modules=config.targets,
        lora_dropout=config.dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # Seeded here because the A matrices are initialised randomly.
    torch.manual_seed(config.seed)
    return get_peft_model(model, lora)


def batches(items: list[Encoded], size: int, generator: torch.Generator) -> list[list[Encoded]]:
    order = torch.randperm(len(items), generator=generator).tolist()
    return [[items[i] for i in order[start : start + size]] for start in range(0, len(order), size)]


def lr_lambda(total: int, warmup: float):
    warm = max(1, int(total * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return factor


class EpochLoss:
    """Token-weighted running mean of one epoch's training loss: what the progress bar shows, so its
    last value is the epoch's figure in the summary."""

    def __init__(self) -> None:
        self.total, self.tokens = 0.0, 0

    def add(self, batch_mean: float, tokens: int) -> None:
        self.total += batch_mean * tokens
        self.tokens += tokens

    @property
    def mean(self) -> float:
        return self.total / max(1, self.tokens)


def train(model: PeftModel, data: list[Encoded], config: TrainConfig, pad_id: int, progress: bool = True,
          held_out: list[Encoded] | None = None, log: Callable[[str], None] = print) -> TrainStats:
    """Fit the LoRA weights of `model` (already wrapped) on `data`, for at most `config.epochs` epochs.

    With `held_out`, the held-out loss is measured after every epoch; training stops once it has not
    improved by `config.min_delta` for `config.patience` epochs, and the weights of the best epoch are kept."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, config.warmup))
    generator = torch.Generator().manual_seed(config.seed)
    start, step = time.perf_counter(), 0
    train_losses: list[float] = []
    held_losses: list[float] = []
    best_epoch, best_state, improved_at = 0, None, 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        epoch_loss = EpochLoss()
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", unit="step", disable=not progress)
        for batch in batches(data, config.batch_size, generator):
            tensors = {key: value.to(device) for key, value in collate(batch, pad_id).items()}
            loss = model(**tensors).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            epoch_loss.add(loss.item(), completion_tokens(tensors["labels"]))
            bar.set_postfix(train_loss=f"{epoch_loss.mean:.4f}")
            bar.update(1)
            step += 1
        bar.close()
        train_losses.append(epoch_loss.mean)
        line = f"epoch {epoch}/{config.epochs}: train loss {epoch_loss.mean:.4f}"
        if held_out:
            model.eval()
            held_losses.append(mean_loss(model, held_out, pad_id))
            line += f", held-out loss {held_losses[-1]:.4f}"
            if best_state is None or held_losses[-1] < held_losses[best_epoch - 1]:
                if best_state is None or held_losses[-1] < held_losses[best_epoch - 1] - config.min_delta:
                    improved_at = epoch
                best_epoch, best_state = epoch, [p.detach().clone() for p in params]
                line += " (best)"
        else:
            best_epoch = improved_at = epoch
        log(line)
        if held_out and epoch - improved_at >= config.patience:
            log(f"early stop: held-out loss not lower by {config.min_delta:g} for {config.patience} epoch(s); "
                f"keeping epoch {best_epoch}")
            break
    if best_state is not None:
        with torch.no_grad():
            for param, saved in zip(params, best_state):
                param.copy_(saved)
    model.eval()
    return TrainStats(step, time.perf_counter() - start, train_losses, held_losses, best_epoch,
                      sum(p.numel() for p in params), config.epochs)


def completion_tokens(labels: torch.Tensor) -> int:
    """Tokens the causal-LM loss averages over: labels shifted by one, padding and prompt excluded."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def save_adapter(model: PeftModel, output: Path, base_name: str) -> None:
    """A standard PEFT folder: adapter_config.json + adapter_model.safetensors, never pickle."""
    output.mkdir(parents=True, exist_ok=True)
    # Saved while the config still names the local base folder: given a bare name, PEFT would look
    # the name up on the Hub. The file then records the served name instead of a local path.
    model.save_pretrained(str(output), safe_serialization=True)
    config_file = output / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base_name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for stray in output.glob("*.bin"):
        stray.unlink()
