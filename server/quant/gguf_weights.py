"""Swap a loaded model's linear layers (and its token embedding and output head) for modules holding the
blocks of the GGUF it came from.

The model is first loaded as transformers loads a GGUF (dequantized to float32: config, tokenizer and
every weight); then each linear layer whose GGUF tensor is of a type the kernels compute (Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) is replaced by a `QuantLinear` of the file's blocks, the token embedding by a `QuantEmbedding`
and the output head (the embedding's blocks when the two are tied) by a `QuantLinear`, and the float32
weights are dropped. A module is swapped only if
its dequantized blocks equal the float32 weight transformers made of them (the check that the tensor
names and row order map exactly, including the rotary row permutation llama.cpp's converter applies to
Llama and Mistral q/k projections); others (F16, BF16, the IQ types, ...) stay as transformers dequantized
them, float32, and one log line says how many, which types and why.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from server.quant.linear import BLOCKS, TYPE_NAMES, QuantEmbedding, QuantLinear, row_bytes, type_name

log = logging.getLogger(__name__)
PERMUTED_ARCHS = ("llama", "mistral")  # llama.cpp's converter permutes their q/k rows for its rotary layout


@dataclass
class QuantReport:
    """What the swap did: bytes of quantized blocks, float32 bytes they replaced, layers left float32."""

    quantized: dict[str, str] = field(default_factory=dict)   # module name -> type name
    kept: dict[str, str] = field(default_factory=dict)        # module name -> why it stays float32
    block_bytes: int = 0
    float_bytes: int = 0


def quantize_from_gguf(model: PreTrainedModel, gguf_path: Path, int8: bool = False) -> QuantReport:
    """Replace `model`'s linear layers, token embedding and output head by their GGUF blocks (`int8`: the
    linear layers' decode rows in the int8-activation mode)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    arch = _field_text(reader, "general.architecture")
    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model.config.num_hidden_layers)
    output = model.get_output_embeddings()
    report = QuantReport()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or module is output:
            continue
        tensor = tensors.get(f"{names.get_name(name)}.weight") if names.get_name(name) else None
        why = _why_kept(tensor)
        if why is not None:
            report.kept[name] = why
            continue
        assert tensor is not None  # _why_kept refuses a missing tensor
        layer = QuantLinear(_blocks_in_row_order(tensor, name, arch, model.config), int(tensor.tensor_type),
                            module.in_features, module.out_features, module.bias, int8)
        _swap(model, name, layer, module.weight, report)
    _swap_embedding_and_head(model, tensors, report, int8)
    _own_memory(model)
    if report.kept:
        log.info("%d layers dequantized to float32 at load, not kept in blocks: %s", len(report.kept),
                 "; ".join(f"{count} x {why}" for why, count in Counter(report.kept.values()).most_common()))
    return report


def _swap_embedding_and_head(model: PreTrainedModel, tensors: dict, report: QuantReport, int8: bool) -> None:
    """The token embedding from `token_embd`, the output head from `output` (or `token_embd`, tied)."""
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    table = tensors.get("token_embd.weight")
    tied = output is not None and output.weight is embedding.weight
    table_blocks = None if _why_kept(table) is not None else _blocks_in_row_order(table, "", "", None)
    if isinstance(embedding, nn.Embedding) and table is not None and table_blocks is not None:
        layer = QuantEmbedding(table_blocks, int(table.tensor_type), embedding.embedding_dim)
        _swap(model, _name_of(model, embedding), layer, embedding.weight, report)
    head = tensors.get("output.weight", table if tied else None)
    if isinstance(output, nn.Linear) and output.bias is None and head is not None and _why_kept(head) is None:
        blocks = table_blocks if head is table else _blocks_in_row_order(head, "", "", None)  # tied: one copy
        layer = QuantLinear(blocks, int(head.tensor_type), output.in_features, output.out_features, int8=int8)
        weight = output.weight
        if _swap(model, _name_of(model, output), layer, weight, report) and head is table:
            report.block_bytes -= layer.blocks.numel()  # one table, counted with the embedding
            report.float_bytes -= weight.numel() * weight.element_size()
            embedding = model.get_input_embeddings()
            if isinstance(embedding, QuantEmbedding):
                embedding.share(layer)


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _swap(model: nn.Module, name: str, new: QuantLinear | QuantEmbedding, weight: torch.Tensor,
          report: QuantReport) -> bool:
    """Put `new` in place of the module `name` if it computes the same weight; whether it did."""
    why = _differs(new, weight)
    if why is not None:
        report.kept[name] = why
        return False
    model.set_submodule(name, new)
    report.quantized[name] = type_name(new.qtype)
    report.block_bytes += new.blocks.numel()
    report.float_bytes += weight.numel() * weight.element_size()
    return True


def _own_memory(model: nn.Module) -> None:
    """Copy the weights left in float32 out of the loaded file's memory map, so that the map (the float32
    copy of every layer swapped) is released once its last view is gone."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dtype != torch.uint8:  # quantized blocks are copies already (and tied ones shared)
                tensor.data = tensor.data.clone()


def _field_text(reader, key: str) -> str:
    entry = reader.fields[key]
    return bytes(entry.parts[entry.data[0]]).decode()


def _why_kept(tensor) -> str | None:
    if tensor is None:
        return "no tensor of that name in the GGUF"
    if int(tensor.tensor_type) not in BLOCKS:
        return f"{tensor.tensor_type.name} (the kernels compute {', '.join(TYPE_NAMES.values())})"
    if row_bytes(int(tensor.tensor_type), int(tensor.shape[0])) is None:
        return f"{tensor.tensor_type.name} rows of {int(tensor.shape[0])} weights (not whole blocks)"
    return None


def _blocks_in_row_order(tensor, name: str, arch: str, config) -> torch.Tensor:
    """The tensor's blocks `[out_features, bytes per row]`, rows in the model's order."""
    # A copy in owned memory (the reader's map of the file can close), rows in the file's order.
    blocks = torch.from_numpy(np.array(tensor.data, copy=True).view(np.uint8))
    rows = int(tensor.shape[-1]) if len(tensor.shape) > 1 else 1
    blocks = blocks.reshape(rows, -1)
    if arch in PERMUTED_ARCHS and name.endswith(("q_proj", "k_proj")):
        heads = config.num_attention_heads if name.endswith("q_proj") else config.num_key_value_heads
        half = rows // heads // 2
        order = torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(rows)
        blocks = blocks[order]
    return blocks


def _differs(layer: QuantLinear | QuantEmbedding, weight: torch.Tensor) -> str | None:
    """None when the blocks dequantize to `weight` (to float32 rounding), else the reason."""
    dequantized = layer.weight
    if dequantized.shape != weight.shape:
        return f"shape {tuple(dequantized.shape)} != {tuple(weight.shape)}"
    scale = float(weight.abs().max()) or 1.0
    worst = float((dequantized - weight.float()).abs().max())
    return None if worst <= 1e-6 * scale else f"its blocks dequantize {worst:.3g} away from the loaded weight"
