"""What a PEFT LoRA adapter may carry beside A and B on the output layer and the input embedding:
fully trained copies (`modules_to_save`), trainable token rows (`trainable_token_indices`) and the
copies of the base weights PEFT saves beside embedding LoRA. Parsed and validated here.

The semantics follow PEFT (`_set_trainable`, `TrainableTokensLayer`, `save_embedding_layers`):
a `modules_to_save` entry names every module whose name ends with it; trainable token rows
replace the base's rows for their token ids, and, when the output layer shares the embedding's
weight (tied), the output layer's rows too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .layout import BaseLayout
from .peft_config import AdapterFormatError

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_ENTRIES = 64
_Found = dict[str, tuple[str, torch.Tensor]]  # module -> (tensor name, tensor)


@dataclass(frozen=True, eq=False)
class TokenRows:
    """Rows of one module's weight that replace the base's for some token ids.

    `indices [k]` int64 (unique, in range), `rows [k, dim]` float32 (CPU, contiguous): for the input
    embedding the embeddings of those tokens, for the output layer their output weights.
    """

    indices: torch.Tensor
    rows: torch.Tensor


def special_modules(layout: BaseLayout) -> tuple[str, ...]:
    """The modules a copy or token rows may replace: the output layer and the input embedding."""
    return tuple(n for n in (layout.output_name, layout.input_embedding) if n in layout.special_dims)


def saved_modules(config: dict[str, Any], found: _Found, layout: BaseLayout) -> dict[str, torch.Tensor]:
    """modules_to_save: base module name -> its fully trained weight, shape and values checked."""
    names = _matched(config.get("modules_to_save"), "modules_to_save", layout)
    for name in names:
        if name not in special_modules(layout):
            raise AdapterFormatError(
                f"modules_to_save names {name!r}: only the output layer ({layout.output_name}) and the input "
                f"embedding ({layout.input_embedding}) can be served as fully trained copies; other modules "
                "(a classification head, a norm) change the model beyond what this server runs")
    extra = sorted(found.keys() - set(names))
    if extra:
        raise AdapterFormatError(f"unexpected tensor {found[extra[0]][0][:200]!r} (not a LoRA weight, and "
                                 "modules_to_save does not name its module)")
    missing = sorted(set(names) - found.keys())
    if missing:
        raise AdapterFormatError(f"modules_to_save names {missing[0]!r} but the file has no {missing[0]}.weight")
    return {name: _weight(*found[name], _weight_shape(name, layout)) for name in sorted(names)}


def trainable_tokens(config: dict[str, Any], found: _Found, layout: BaseLayout,
                     saved: dict[str, torch.Tensor]) -> dict[str, TokenRows]:
    """trainable_token_indices: base module name -> its token rows (the tied output layer included)."""
    wanted = _token_indices(config.get("trainable_token_indices"), layout)
    extra = sorted(found.keys() - wanted.keys())
    if extra:
        raise AdapterFormatError(f"unexpected tensor {found[extra[0]][0][:200]!r}: trainable_token_indices "
                                 "does not name its module")
    tokens: dict[str, TokenRows] = {}
    for name, indices in wanted.items():
        if name in saved:
            raise AdapterFormatError(f"{name} is both in modules_to_save and in trainable_token_indices")
        if name not in found:
            raise AdapterFormatError(f"trainable_token_indices names {name} but the file has no "
                                     f"{name}.token_adapter.trainable_tokens_delta")
        rows = _weight(*found[name], (len(indices), layout.special_dims[name][1 if _is_input(name, layout) else 0]))
        tokens[name] = TokenRows(torch.tensor(indices, dtype=torch.int64), rows.float().contiguous())
    return _with_tied_output(tokens, layout)


def check_base_copies(found: _Found, layout: BaseLayout) -> None:
    """PEFT saves the base weights of the output layer and the input embedding beside embedding LoRA
    (for resized vocabularies); served only when they are the base's own."""
    for name, (key, tensor) in found.items():
        reference = layout.reference.get(name)
        if reference is None:
            raise AdapterFormatError(f"unexpected tensor {key[:200]!r}: a base weight copy of a module that is "
                                     "neither the output layer nor the input embedding")
        copy = _weight(key, tensor, tuple(reference.shape))
        if not _same_values(copy, reference):
            raise AdapterFormatError(f"tensor {key[:200]!r} differs from the base model's {name} weight (an adapter "
                                     "trained on a resized or changed vocabulary): it only serves on its own base")


def _same_values(copy: torch.Tensor, reference: torch.Tensor) -> bool:
    """Equal up to the rounding of the coarser of the two dtypes (a copy saved in bfloat16 of a float32 base)."""
    tolerance = max(torch.finfo(copy.dtype).eps, torch.finfo(reference.dtype).eps)
    for start in range(0, reference.shape[0], 4096):  # bounded temporaries for a large vocabulary
        ours = copy[start:start + 4096].to(reference.device, torch.float32)
        base = reference[start:start + 4096].to(torch.float32)
        if not torch.allclose(ours, base, rtol=tolerance, atol=1e-6):
            return False
    return True


def _matched(entries: Any, field: str, layout: BaseLayout) -> list[str]:
    """Module names matched by a list of PEFT entries (a name matches when it ends with the entry)."""
    if not entries:
        return []
    if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries) or len(entries) > _MAX_ENTRIES:
        raise AdapterFormatError(f"{field} must be a list of at most {_MAX_ENTRIES} non-empty strings")
    names = sorted(layout.linear.keys() | layout.other)
    matched: list[str] = []
    for entry in entries:
        hits = [name for name in names if name.endswith(entry)]
        if not hits:
            raise AdapterFormatError(f"{field} entry {entry[:80]!r} matches no module of the base model")
        matched += [hit for hit in hits if hit not in matched]
    return matched


def _token_indices(value: Any, layout: BaseLayout) -> dict[str, list[int]]:
    if not value:
        return {}
    by_entry = value if isinstance(value, dict) else {"": value}
    wanted: dict[str, list[int]] = {}
    for entry, indices in by_entry.items():
        names = [layout.input_embedding] if entry == "" else _matched([entry], "trainable_token_indices", layout)
        for name in names:
            if name is None or name not in special_modules(layout):
                raise AdapterFormatError(f"trainable_token_indices names {name or 'the input embedding'!r}: only "
                                         "the input embedding and the output layer can have trainable tokens here")
            wanted[name] = _indices(indices, layout.special_dims[name], _is_input(name, layout))
    return wanted


def _indices(indices: Any, dims: tuple[int, int], is_input: bool) -> list[int]:
    vocab = dims[0] if is_input else dims[1]
    ok = isinstance(indices, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in indices)
    if not ok or not indices or len(indices) > vocab:
        raise AdapterFormatError("trainable_token_indices must give a non-empty list of token ids per module")
    if any(not 0 <= i < vocab for i in indices):
        raise AdapterFormatError(f"trainable_token_indices holds a token id outside the vocabulary (0..{vocab - 1})")
    if len(set(indices)) != len(indices):
        raise AdapterFormatError("trainable_token_indices lists a token id twice")
    return indices


def _with_tied_output(tokens: dict[str, TokenRows], layout: BaseLayout) -> dict[str, TokenRows]:
    """With tied weights PEFT gives the output layer the embedding's token rows (the same tensor)."""
    embedding, output = layout.input_embedding, layout.output_name
    if output is None or not layout.tied or embedding not in tokens:
        return tokens
    if output in tokens and not torch.equal(tokens[output].indices, tokens[embedding].indices):
        raise AdapterFormatError("trainable_token_indices gives the tied output layer and input embedding "
                                 "different token ids; give both the same ids")
    return {**tokens, output: tokens[embedding]}


def _is_input(name: str, layout: BaseLayout) -> bool:
    return name == layout.input_embedding


def _weight_shape(name: str, layout: BaseLayout) -> tuple[int, int]:
    """Shape of a module's own weight: the embedding's [vocab, dim], the output layer's [out, in]."""
    first, second = layout.special_dims[name]
    return (first, second) if _is_input(name, layout) else (second, first)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in `tensor` (float16, bfloat16 or float32): its sum in float64 is finite exactly then (a
    float64 sum of float32 values cannot overflow), one pass without a temporary; `isfinite().all()` made
    a bool copy and took three quarters of an adapter's parse."""
    return math.isfinite(tensor.sum(dtype=torch.float64).item())


def _weight(key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor as saved (an owned, contiguous copy) after dtype, shape and value checks."""
    if tensor.dtype not in _FLOAT_DTYPES:
        raise AdapterFormatError(f"tensor {key[:200]!r} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                                 "expected float16, bfloat16 or float32")
    if tuple(tensor.shape) != tuple(shape):
        raise AdapterFormatError(f"tensor {key[:200]!r} has shape {list(tensor.shape)}, expected {list(shape)} "
                                 "(the base model's layer)")
    copy = tensor.contiguous().clone()
    if not all_finite(copy):
        raise AdapterFormatError(f"tensor {key[:200]!r} contains NaN or Inf values")
    return copy
