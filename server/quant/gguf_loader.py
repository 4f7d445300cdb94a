"""Build a model straight from a GGUF file, its weights kept in their quantized blocks, with no float32 copy of
the model at any point.

    model, report = load_gguf_model(config, Path("model.gguf"), int8=False)

The model is made from its config with empty (meta) parameters; then the file's tensors are read one by one:
a linear layer's weight, or the token embedding's, of a type the kernels compute becomes a `QuantLinear` /
`QuantEmbedding` of the file's bytes (read into memory of its own, not a map of the file); every other tensor
(norms, biases, types without kernels) is dequantized to float32 as transformers would. transformers' own GGUF
name map and tensor processor say where each tensor goes and how it is transformed; a transform of a kept
weight must be a row permutation (llama.cpp's converter interleaves Llama's q/k rows for its rotary layout),
which is applied to the block rows as they are: blocks run along the input dimension. The tied output head is
a `QuantLinear` over the embedding's blocks (one copy). Resident weights: the file's weight bytes, plus float32
for whatever is dequantized; the load's peak adds one tensor's bytes at most.
"""

from __future__ import annotations

import logging
from collections import Counter
from io import BufferedReader
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from server.quant.gguf_weights import QuantReport, _field_text, _why_kept
from server.quant.linear import TYPE_NAMES, QuantEmbedding, QuantLinear, type_name

log = logging.getLogger(__name__)


class GGUFLoadError(RuntimeError):
    """The GGUF cannot be loaded this way (a tensor without a place, a parameter without a tensor)."""


def load_gguf_model(config, gguf_path: Path, int8: bool = False) -> tuple[nn.Module, QuantReport]:
    """A causal LM of `config` (transformers' config of this GGUF) holding the file's weights, eval mode,
    no gradients; `int8`: the linears' decode rows in the int8-activation mode."""
    import gguf
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    reader = gguf.GGUFReader(str(gguf_path))
    arch = _field_text(reader, "general.architecture")
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) computed
        model: Any = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)  # GGUF tensor name -> parameter name
    loader = _Loader(model, processor, names)
    kept = []
    for tensor in reader.tensors:
        target = names.get(tensor.name)
        if target is None:
            continue
        module_name, _, attr = target.rpartition(".")
        module = model.get_submodule(module_name)
        order = loader.row_order(tensor)
        if attr == "weight" and isinstance(module, (nn.Linear, nn.Embedding)) and _why_kept(tensor) is None \
                and order is not None:
            kept.append((module_name, module, tensor, order))
        else:  # biases go in first: a linear layer takes its bias when its blocks replace it
            if isinstance(module, nn.Linear) and attr == "weight":
                loader.report.kept[module_name] = _why_kept(tensor) or "its transform is not a row permutation"
            loader.set_float(module, attr, tensor)
    with open(gguf_path, "rb") as file:
        for module_name, module, tensor, order in kept:
            loader.keep(module_name, module, _read_blocks(file, tensor, order), int(tensor.tensor_type), int8)
    loader.tie_head(int8)
    missing = [name for name, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if missing:
        raise GGUFLoadError(f"{gguf_path.name} has no tensor for {', '.join(missing[:5])}")
    if loader.report.kept:
        log.info("%d layers dequantized to float32 at load, not kept in blocks: %s", len(loader.report.kept),
                 "; ".join(f"{n} x {why}" for why, n in Counter(loader.report.kept.values()).most_common()))
    return model.eval().requires_grad_(False), loader.report


class _Loader:
    """The model being filled, transformers' tensor processor and name map, and the report."""

    def __init__(self, model: Any, processor, names: dict[str, str]) -> None:
        self.model, self.processor, self.names = model, processor, names
        self.report = QuantReport()
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        tie = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
        self.tied = head is not None and (head.weight is embedding.weight or tie)

    def _process(self, weights: np.ndarray, name: str) -> np.ndarray:
        return self.processor.process(weights=weights, name=name, tensor_key_mapping=self.names,
                                      parsed_parameters={"config": self.processor.config, "tensors": {}}).weights

    def row_order(self, tensor) -> torch.Tensor | None:
        """The permutation transformers applies to this tensor's rows (None: its transform is something else)."""
        rows = int(tensor.shape[-1]) if len(tensor.shape) > 1 else 1
        index = np.arange(rows, dtype=np.float64)[:, None]
        try:
            out = np.asarray(self._process(index.copy(), tensor.name))
        except Exception:  # noqa: BLE001 - a processor that cannot take it: not a plain row permutation
            return None
        if out.shape != index.shape or not np.array_equal(np.sort(out[:, 0]), index[:, 0]):
            return None
        return torch.from_numpy(out[:, 0].astype(np.int64))

    def set_float(self, module: nn.Module, attr: str, tensor) -> None:
        """`module.attr` = the tensor dequantized and transformed as transformers loads it, float32."""
        import gguf

        weights = self._process(gguf.quants.dequantize(tensor.data, tensor.tensor_type), tensor.name)
        value = torch.from_numpy(np.array(weights, dtype=np.float32))  # a copy: not a view of the file's map
        current = getattr(module, attr)
        if tuple(value.shape) != tuple(current.shape):
            raise GGUFLoadError(f"{tensor.name}: shape {tuple(value.shape)}, the model's is {tuple(current.shape)}")
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)

    def keep(self, name: str, module: Any, blocks: torch.Tensor, qtype: int, int8: bool) -> None:
        """`module` replaced by its blocks' layer."""
        new: nn.Module
        if isinstance(module, nn.Embedding):
            new = QuantEmbedding(blocks, qtype, module.embedding_dim)
            weights = module.num_embeddings * module.embedding_dim
        else:
            bias = module.bias if module.bias is not None and not module.bias.is_meta else None
            if module.bias is not None and bias is None:
                raise GGUFLoadError(f"{name}: no tensor for its bias")
            new = QuantLinear(blocks, qtype, module.in_features, module.out_features, bias, int8)
            weights = module.in_features * module.out_features
        self.model.set_submodule(name, new)
        self.report.quantized[name] = TYPE_NAMES[qtype]
        self.report.block_bytes += blocks.numel()
        self.report.float_bytes += 4 * weights

    def tie_head(self, int8: bool) -> None:
        """A tied output head: a `QuantLinear` over the kept embedding's blocks, or the float32 table itself."""
        embedding, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        if not self.tied or isinstance(head, QuantLinear) or not head.weight.is_meta:  # the file had its own
            return
        name = next(n for n, m in self.model.named_modules() if m is head)
        if isinstance(embedding, QuantEmbedding) and head.bias is None:
            tied = QuantLinear(embedding.blocks.data, embedding.qtype, head.in_features, head.out_features, int8=int8)
            self.model.set_submodule(name, tied)
            embedding.share(tied)
            self.report.quantized[name] = type_name(embedding.qtype)
        elif not isinstance(embedding, QuantEmbedding):
            head.weight = embedding.weight


def _read_blocks(file: BufferedReader, tensor, order: torch.Tensor) -> torch.Tensor:
    """The tensor's blocks `[rows, bytes per row]` read into memory of their own, rows in the model's order."""
    data = torch.empty(int(tensor.n_bytes), dtype=torch.uint8)
    file.seek(int(tensor.data_offset))
    if file.readinto(data.numpy()) != data.numel():  # type: ignore[arg-type]
        raise GGUFLoadError(f"{tensor.name}: the file ends inside its data")
    blocks = data.view(order.numel(), -1)
    return blocks if torch.equal(order, torch.arange(order.numel())) else blocks[order]
