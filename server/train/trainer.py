"""The training loop: PEFT LoRA on a frozen base, AdamW, linear warmup and decay. No Trainer."""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm import tqdm
from transformers import PreTrainedModel

from server.train.data import Encoded, collate


@dataclass
class TrainConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: str | list[str] = "all-linear"
    dropout: float = 0.0
    lr: float = 1e-3
    epochs: int = 2
    batch_size: int = 8
    seed: int = 0
    max_length: int = 256
    warmup: float = 0.05  # fraction of the steps spent warming up the learning rate


@dataclass
class TrainStats:
    steps: int
    seconds: float
    first_loss: float
    last_loss: float  # mean over the last epoch's batches
    trainable_params: int


def parse_targets(text: str) -> str | list[str]:
    """`all-linear` stays PEFT's keyword; anything else is a comma-separated module list."""
    text = text.strip()
    if text == "all-linear":
        return text
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("--targets must name at least one module")
    return names


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
        lora_alpha=config.alpha,
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


def train(model: PeftModel, data: list[Encoded], config: TrainConfig, pad_id: int, progress: bool = True) -> TrainStats:
    """Fit the LoRA weights of `model` (already wrapped) on `data`."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, config.warmup))
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    start, first, epoch_losses, step = time.perf_counter(), math.nan, [], 0
    bar = tqdm(total=total, desc="train", unit="step", disable=not progress)
    running = None
    for _ in range(config.epochs):
        epoch_losses = []
        for batch in batches(data, config.batch_size, generator):
            tensors = {key: value.to(device) for key, value in collate(batch, pad_id).items()}
            loss = model(**tensors).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            value = loss.item()
            first = value if step == 0 else first
            epoch_losses.append(value)
            # An exponential average: one batch's loss is too noisy to read.
            running = value if running is None else 0.9 * running + 0.1 * value
            bar.set_postfix(loss=f"{running:.4f}")
            bar.update(1)
            step += 1
    bar.close()
    model.eval()
    seconds = time.perf_counter() - start
    last = sum(epoch_losses) / max(1, len(epoch_losses))
    return TrainStats(step, seconds, first, last, sum(p.numel() for p in params))


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
