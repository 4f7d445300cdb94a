"""A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors), parsed and
validated against the base model's layout.

Input is untrusted (HTTP uploads): anything wrong is an `AdapterFormatError` whose message
says what, and weights are only ever read with safetensors (never pickle / torch.load).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors  # safetensors only: never torch.load or pickle
from safetensors.torch import load_file as load_safetensors_file

from .layout import BaseLayout
from .names import CONFIG_FILE, WEIGHTS_FILE
from .peft_config import (
    DEFAULT_LORA_ALPHA,
    AdapterFormatError,
    ModulePlan,
    parse_config,
    plan_modules,
    reject_unless_adaptable,
)
from .peft_extras import TokenRows, all_finite, check_base_copies, saved_modules, trainable_tokens

__all__ = ["AdapterFormatError", "LoraModuleWeights", "ParsedAdapter", "TokenRows", "load_peft_adapter",
           "looks_like_pickle", "parse_peft_adapter"]

CONFIG_NAME = CONFIG_FILE
WEIGHTS_NAME = WEIGHTS_FILE
PICKLE_NAME = "adapter_model.bin"
_KEY_PREFIX = "base_model.model."
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PICKLE_REFUSED = (
    "pickle weights are refused (loading them can run arbitrary code); convert the adapter to "
    "adapter_model.safetensors (e.g. PEFT save_pretrained(..., safe_serialization=True))"
)


@dataclass(frozen=True, eq=False)
class LoraModuleWeights:
    """One module's LoRA; for the input embedding `in_features` is the vocabulary and `out_features`
    the embedding width (PEFT's lora_embedding_A [r, vocab] and lora_embedding_B [dim, r])."""

    a: torch.Tensor  # [r, in_features], float32, CPU, contiguous
    b: torch.Tensor  # [out_features, r], float32, CPU, contiguous, NOT yet scaled
    scale: float  # lora_alpha/r, or lora_alpha/sqrt(r) with use_rslora, per-module patterns applied
    magnitude: torch.Tensor | None = None  # DoRA's m [out_features], float32; None for plain LoRA


@dataclass(frozen=True, eq=False)
class ParsedAdapter:
    rank: int  # max rank over modules
    alpha: float  # config lora_alpha
    target_modules: tuple[str, ...]  # sorted base module names that carry LoRA
    modules: dict[str, LoraModuleWeights]  # keyed by base module name
    config: dict[str, Any]  # the parsed adapter_config.json
    size_bytes: int  # size of the safetensors file
    # modules_to_save: base module name -> its fully trained weight [vocab, dim], as saved (CPU, contiguous)
    saved: dict[str, torch.Tensor] = field(default_factory=dict)
    # trainable_token_indices: base module name -> the rows that replace the base's for those token ids
    tokens: dict[str, TokenRows] = field(default_factory=dict)

    @property
    def dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())

    @property
    def saved_bytes(self) -> int:
        """Bytes of the fully trained module copies as saved (what they take in the CPU tier)."""
        return sum(t.nbytes for t in self.saved.values())

    def kinds(self) -> tuple[str, ...]:
        """What this adapter computes beyond plain LoRA on linear layers (for refusals and listings)."""
        kinds = ["dora"] if self.dora else []
        kinds += [f"saved:{name}" for name in sorted(self.saved)] + [f"tokens:{n}" for n in sorted(self.tokens)]
        return tuple(kinds)


def load_peft_adapter(folder: Path, layout: BaseLayout, max_rank: int) -> ParsedAdapter:
    """Read a PEFT adapter folder and parse it (see `parse_peft_adapter`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterFormatError(f"adapter folder {folder.name!r} does not exist")
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file():
        raise AdapterFormatError(f"the adapter folder has no {CONFIG_NAME}")
    if not weights_path.is_file():
        if (folder / PICKLE_NAME).exists():
            raise AdapterFormatError(f"the adapter has {PICKLE_NAME} but no {WEIGHTS_NAME}: {_PICKLE_REFUSED}")
        raise AdapterFormatError(f"the adapter folder has no {WEIGHTS_NAME}")
    return parse_peft_adapter(_read(config_path), weights_path, layout, max_rank)


def parse_peft_adapter(config_bytes: bytes, weights: bytes | Path, layout: BaseLayout,
                       max_rank: int) -> ParsedAdapter:
    """Validate an adapter against the base layout and return its weights as float32.

    `weights` is the safetensors file's bytes or its path; a path is memory-mapped, so a large
    file is never copied whole into Python memory (which holds the GIL and stalls other threads).
    Cheap config checks run before the tensors are decoded, so a bad upload fails fast.
    """
    config = parse_config(config_bytes)
    plans = plan_modules(config, layout)
    _check_rank_limit(plans, max_rank)
    pairs = _pair_tensors(_read_tensors(weights), layout)
    saved = saved_modules(config, _take(pairs, "S"), layout)
    tokens = trainable_tokens(config, _take(pairs, "T"), layout, saved)
    check_base_copies(_take(pairs, "base"), layout)
    _check_one_kind_per_module(plans, saved, tokens)
    _check_same_modules(plans, pairs)
    modules = {name: _module_weights(name, plans[name], pairs[name], layout) for name in sorted(plans)}
    return ParsedAdapter(
        rank=max(plan.rank for plan in plans.values()),
        alpha=float(config.get("lora_alpha", DEFAULT_LORA_ALPHA)),
        target_modules=tuple(modules),
        modules=modules,
        config=config,
        size_bytes=len(weights) if isinstance(weights, bytes) else _file_size(weights),
        saved=saved,
        tokens=tokens,
    )


def looks_like_pickle(head: bytes) -> bool:
    """True for the first bytes of a torch.save zip archive or a raw pickle stream (protocol 2-5)."""
    return head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AdapterFormatError(f"cannot read {path.name}: {exc.strerror}") from None


def _check_rank_limit(plans: dict[str, ModulePlan], max_rank: int) -> None:
    name, plan = max(plans.items(), key=lambda item: item[1].rank)
    if plan.rank > max_rank:
        raise AdapterFormatError(
            f"adapter rank {plan.rank} (module {name!r}) exceeds this server's max LoRA rank of {max_rank}; "
            "restart the server with a higher --max-lora-rank"
        )


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise AdapterFormatError(f"cannot read {path.name}: {exc.strerror}") from None


def _head(weights: bytes | Path) -> bytes:
    if isinstance(weights, bytes):
        return weights[:4]
    try:
        with open(weights, "rb") as handle:
            return handle.read(4)
    except OSError:
        return b""


def _read_tensors(weights: bytes | Path) -> dict[str, torch.Tensor]:
    """The file's tensors (views of `weights` or of its memory map: `_checked` copies what it keeps)."""
    try:
        if isinstance(weights, Path):
            return load_safetensors_file(weights)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.frombuffer on read-only bytes
            return load_safetensors(weights)
    except BaseException as exc:
        # safetensors raises its own error types on bad input, and a Rust panic surfaces as
        # pyo3's PanicException, which derives from BaseException: all of them mean "bad file".
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            raise
        if looks_like_pickle(_head(weights)):
            raise AdapterFormatError(f"the weights look like a torch.save/pickle file: {_PICKLE_REFUSED}") from None
        raise AdapterFormatError(
            f"{WEIGHTS_NAME} is not a valid safetensors file (truncated or corrupt?): {str(exc)[:200]}"
        ) from None


# Tensor name endings PEFT writes (adapter name "default" stripped or not) -> what the tensor is:
# A / B (a linear layer's or the input embedding's), M (DoRA magnitude), base (a copy of the base
# weight PEFT saves beside embedding LoRA), T (trainable token rows), S (a modules_to_save copy).
_SUFFIXES: tuple[tuple[str, str], ...] = tuple(
    (suffix, kind) for kind, stems in (
        ("A", (".lora_A.weight", ".lora_A.default.weight", ".lora_embedding_A", ".lora_embedding_A.default")),
        ("B", (".lora_B.weight", ".lora_B.default.weight", ".lora_embedding_B", ".lora_embedding_B.default")),
        ("M", (".lora_magnitude_vector", ".lora_magnitude_vector.weight", ".lora_magnitude_vector.default.weight")),
        ("base", (".base_layer.weight",)),
        ("T", (".token_adapter.trainable_tokens_delta", ".token_adapter.trainable_tokens_delta.default")),
        ("S", (".weight",)),  # last: every other ending above also ends in `.weight`
    ) for suffix in stems)


def _split_key(key: str) -> tuple[str, str]:
    """'base_model.model.<module>.lora_A[.default].weight' -> ('<module>', 'A'); see `_SUFFIXES`."""
    if ".lora_B" in key and key.endswith(".bias"):
        raise AdapterFormatError(f"tensor {key!r}: LoRA biases (lora_bias) are not supported")
    if key.startswith(_KEY_PREFIX):
        body = key[len(_KEY_PREFIX) :]
        for suffix, kind in _SUFFIXES:
            if body.endswith(suffix) and len(body) > len(suffix):
                return body[: -len(suffix)], kind
    raise AdapterFormatError(f"unexpected tensor {key[:200]!r} in {WEIGHTS_NAME} (not a LoRA weight)")


_Pairs = dict[str, dict[str, tuple[str, torch.Tensor]]]  # module -> {kind: (key, tensor)}


def _pair_tensors(tensors: dict[str, torch.Tensor], layout: BaseLayout) -> _Pairs:
    """Group the tensors by base module, each key checked on the way."""
    pairs: _Pairs = {}
    for key, tensor in tensors.items():
        module, which = _split_key(key)
        if which in "ABM":
            reject_unless_adaptable(module, layout, f"tensor {key[:200]!r}")
        slot = pairs.setdefault(module, {})
        if which in slot:
            raise AdapterFormatError(f"duplicate tensors for {module!r}: {slot[which][0]!r} and {key!r}")
        slot[which] = (key, tensor)
    return pairs


def _check_one_kind_per_module(plans: dict[str, ModulePlan], saved: dict, tokens: dict) -> None:
    """A module carries LoRA, a full copy or token rows, not two of them (PEFT refuses most mixes too)."""
    for name in sorted(plans.keys() & (saved.keys() | tokens.keys()) | saved.keys() & tokens.keys()):
        raise AdapterFormatError(f"{name} carries more than one of LoRA, a modules_to_save copy and trainable "
                                 "tokens; this server serves one per module")


def _take(pairs: _Pairs, kind: str) -> dict[str, tuple[str, torch.Tensor]]:
    """Remove the tensors of one kind from `pairs`: module -> (key, tensor)."""
    taken = {module: found.pop(kind) for module, found in pairs.items() if kind in found}
    for module in [m for m, found in pairs.items() if not found]:
        del pairs[module]
    return taken


def _check_same_modules(plans: dict[str, ModulePlan], pairs: _Pairs) -> None:
    """The config's targets and the tensors must describe the same modules: A and B, and DoRA's
    magnitude exactly where the config says use_dora."""
    extra = sorted(pairs.keys() - plans.keys())
    if extra:
        raise AdapterFormatError(
            f"unexpected tensors for {len(extra)} module(s) adapter_config.json does not target, e.g. {extra[0]!r}"
        )
    missing = [f"{m}.lora_{w}.weight" for m in sorted(plans) for w in "AB" if w not in pairs.get(m, {})]
    if missing:
        raise AdapterFormatError(f"missing tensors: {len(missing)} LoRA weight(s), e.g. {missing[0]!r}")
    missing = [m for m in sorted(plans) if plans[m].dora and "M" not in pairs[m]]
    if missing:
        raise AdapterFormatError(f"adapter_config.json sets use_dora but {len(missing)} module(s) have no DoRA "
                                 f"magnitude, e.g. '{missing[0]}.lora_magnitude_vector'")
    stray = [key for m in sorted(plans) if not plans[m].dora and "M" in pairs[m] for key in [pairs[m]["M"][0]]]
    if stray:
        raise AdapterFormatError(f"tensor {stray[0]!r} is a DoRA magnitude but adapter_config.json does not "
                                 "set use_dora")


def _module_weights(
    name: str, plan: ModulePlan, pair: dict[str, tuple[str, torch.Tensor]], layout: BaseLayout
) -> LoraModuleWeights:
    in_features, out_features = layout.dims(name)
    a = _checked(*pair["A"], (plan.rank, in_features), plan.rank)
    b = _checked(*pair["B"], (out_features, plan.rank), plan.rank, rank_major=True)
    magnitude = _checked(*pair["M"], (out_features,), plan.rank) if plan.dora else None
    if magnitude is not None and not bool((magnitude > 0).all()):
        raise AdapterFormatError(f"tensor {pair['M'][0]!r}: a DoRA magnitude must be positive")
    return LoraModuleWeights(a=a, b=b, scale=plan.scale, magnitude=magnitude)


def _checked(key: str, tensor: torch.Tensor, shape: tuple[int, ...], rank: int, rank_major: bool = False) -> torch.Tensor:
    """The tensor as float32 (an owned copy) after dtype, shape and value checks: contiguous, or with
    `rank_major` (B `[out, r]`) the transpose of a contiguous `[r, out]`, the layout of B's block in the
    adapter pool, so that the engine thread's write of a loaded adapter is a straight copy."""
    if tensor.dtype not in _FLOAT_DTYPES:
        raise AdapterFormatError(
            f"tensor {key!r} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
            "LoRA weights must be float16, bfloat16 or float32"
        )
    if tuple(tensor.shape) != shape:
        raise AdapterFormatError(
            f"tensor {key!r} has shape {list(tensor.shape)}, expected {list(shape)} "
            f"(rank {rank} from adapter_config.json and the base layer's size)"
        )
    if rank_major:
        weight = torch.empty(shape[::-1], dtype=torch.float32).copy_(tensor.t()).t()
    else:
        weight = tensor.to(torch.float32, copy=True).contiguous()
    if not all_finite(weight):
        raise AdapterFormatError(f"tensor {key!r} contains NaN or Inf values")
    return weight
