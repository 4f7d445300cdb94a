"""A decoder forward of our own for the Llama family, over the model's own modules and the paged KV cache.

transformers' forward spends a decode step of a small model mostly outside the weights' read: a module call
stack per projection, the rotary embedding applied in a dozen elementwise ops per layer, the step context
handed through hooks, the attention output scattered back by index. For the families whose decoder layer is

    h += o_proj(attention(rotary(q_proj(n1(h))), rotary(k_proj(n1(h))), v_proj(n1(h))))   n1 = input RMSNorm
    h += down_proj(act(gate_proj(n2(h))) * up_proj(n2(h)))                                  n2 = post-attention

(Llama, Mistral, Qwen2, Qwen3 with its q/k norms), `LeanForward` runs that loop itself: the same modules'
forwards (the LoRA layers included: adapters apply exactly as in the transformers path), each residual add
and the RMSNorm after it in one compiled call (`loraplex::add_rms_norm`), the rotary rotation and the cache
write in one compiled call per layer (`loraplex::rope_cache_write`), the decode rows
attended by the compiled kernel straight into the output when a step has no prefill chunk. Where a layer's
q/k/v (and gate/up) projections are quantized blocks of one type, their blocks are laid side by side in one
buffer (the modules keep views of it: no extra bytes) and computed in one kernel call.

It is used only where it is exact: `lean_forward_for` builds it for a supported model on the CPU in float32
with the compiled kernels, then checks it against the transformers path on the start-up probe's steps
(server/engine/probe.py), and otherwise returns None (the runner then keeps transformers' forward).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from server.engine.attention import AttentionOptions, PagedModel, attend_written, finish_logits
from server.engine.decode_kernel import decode_kernel_into
from server.engine.kv_cache import KVCache
from server.engine.step_plan import StepAttention
from server.huge_pages import in_huge_pages
from server.lora.cpu_group import GroupDelta
from server.lora.layers import LoraLinear
from server.lora.step import LoraStepMeta
from server.quant.linear import QuantLinear

log = logging.getLogger(__name__)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _base(module: nn.Module) -> Any:
    return module.base if isinstance(module, LoraLinear) else module


class Projections:
    """Sibling projections of one input (q/k/v, gate/up, or a lone o/down), as few calls as their bases allow.

    `__call__(x [T, in])` returns each member's output `[T, out_i]`, LoRA deltas added. With `fused`, the
    members' bases are `QuantLinear`s of one type without bias whose blocks are row slices of one buffer:
    one kernel call computes all of them (each output row is the same dot product the member would compute).
    With `delta` (every member a LoRA layer of one group in the adapter pool), the group's LoRA deltas are
    one compiled call too.
    """

    def __init__(self, modules: list[Any]) -> None:
        self.lora = [m if isinstance(m, LoraLinear) else None for m in modules]
        self.widths = [int(_base(m).out_features) for m in modules]
        self.fused = _fuse_blocks([_base(m) for m in modules])
        self.first = _base(modules[0])
        self.delta = GroupDelta.of(modules)
        self.bases = [_base(m).forward for m in modules]

    def __call__(self, x: torch.Tensor, lora: LoraStepMeta | None) -> list[torch.Tensor]:
        """The members' outputs for `x`, with the deltas of the step's LoRA plan `lora` (None: base rows only)."""
        if self.fused is None:
            parts = [forward(x) for forward in self.bases]
        else:
            out = torch.ops.loraplex.quant_linear_forward.default(x, self.fused, self.first.qtype, self.first.int8)
            parts = list(torch.split_with_sizes(out, self.widths, -1))  # not Tensor.split's Python wrapper
        if self.delta is not None:
            self.delta.add_(x, parts, lora)
            return parts
        for i, layer in enumerate(self.lora):
            if layer is not None:
                parts[i] = layer.add_lora(parts[i], x, lora)
        return parts


def _fuse_blocks(bases: list[Any]) -> torch.Tensor | None:
    """One buffer of the bases' blocks, rows in member order, each base's `blocks` now a view of it (None when
    they are not all bias-free `QuantLinear`s of one type and mode)."""
    if len(bases) < 2 or not all(isinstance(b, QuantLinear) and b.bias is None for b in bases):
        return None
    first = bases[0]
    if any(b.qtype != first.qtype or b.int8 != first.int8 or b.in_features != first.in_features for b in bases):
        return None
    fused = in_huge_pages(torch.cat([b.blocks.data for b in bases]))
    start = 0
    for b in bases:
        rows = b.blocks.shape[0]
        b.blocks.data = fused[start:start + rows]
        start += rows
    return fused


@dataclass
class LeanLayer:
    """One decoder layer's modules and attention shape."""

    index: int
    input_norm: Any  # modules, called as they are
    post_norm: Any
    qkv: Projections
    o_proj: Projections
    gate_up: Projections
    down_proj: Projections
    act: Any
    q_norm: Any
    k_norm: Any
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    options: AttentionOptions


class LeanForward:
    """The decoder loop above over `paged.model`'s modules: `__call__(kv_cache, step, input_ids [T])` returns
    the logits of `step.last_rows` (`[rows, vocab]`), as `attention.forward_step` does.

    The step's LoRA plan is read once from the model's `StepState` (set by `LoraModel.stepping`) and handed to
    every projection with the attention's plan; the embedding and the output head, called as modules, read it
    there themselves."""

    def __init__(self, paged: PagedModel) -> None:
        model: Any = paged.model
        self.model, self.config = model, model.config
        self.decoder: Any = model.get_decoder()
        self.layers = [_lean_layer(i, layer, model.config) for i, layer in enumerate(self.decoder.layers)]
        self.lora_state = next((m.state for m in model.modules() if isinstance(m, LoraLinear)), None)

    def __call__(self, kv_cache: KVCache, step: StepAttention, input_ids: torch.Tensor) -> torch.Tensor:
        decoder, layers = self.decoder, self.layers
        # The residual stream [T, hidden], updated in place; the embedding is looked up each step (an adapter
        # may wrap it) and is a fresh tensor.
        h = decoder.embed_tokens(input_ids[None])[0].contiguous()
        cos, sin = decoder.rotary_emb(h, step.positions[None])
        cos, sin = cos[0].contiguous(), sin[0].contiguous()  # [T, head_dim]
        decode_only = step.decode_kernel and not step.prefills
        lora = self.lora_state.meta if self.lora_state is not None else None
        x = _add_norm(h, None, layers[0].input_norm)
        for i, layer in enumerate(layers):
            mlp = self._layer(layer, h, x, cos, sin, kv_cache, step, lora, decode_only)
            if i + 1 < len(layers):
                x = _add_norm(h, mlp, layers[i + 1].input_norm)
            else:
                h += mlp
        hidden = decoder.norm(h[step.last_rows])
        return finish_logits(self.config, self.model.get_output_embeddings()(hidden))

    def _layer(self, layer: LeanLayer, h: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               kv_cache: KVCache, step: StepAttention, lora: LoraStepMeta | None, decode_only: bool) -> torch.Tensor:
        """One layer on the normed input `x`: `h` gets the attention's output added in place; returns the MLP's
        output (the caller adds it with the next layer's norm)."""
        n = h.shape[0]
        q, k, v = layer.qkv(x, lora)
        q = q.view(n, layer.heads, layer.head_dim)
        k = k.view(n, layer.kv_heads, layer.head_dim)
        v = v.view(n, layer.kv_heads, layer.head_dim)
        if layer.q_norm is not None and layer.k_norm is not None:
            q, k = layer.q_norm(q), layer.k_norm(k)
        q, k, v = _whole_heads(q), _whole_heads(k), _whole_heads(v)
        index = layer.index
        torch.ops.loraplex.rope_cache_write(q, k, v, cos, sin, step.slot_mapping, kv_cache.keys[index],
                                            kv_cache.values[index])
        if decode_only:  # every row decodes: the kernel writes the attention output in place
            attn = torch.empty(n, layer.heads, layer.head_dim)
            decode_kernel_into(q, kv_cache, index, step, layer.scale, layer.options, attn)
        else:
            attn = attend_written(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                  kv_cache, index, step, layer.scale, layer.options)
        gate, up = layer.gate_up(_add_norm(h, layer.o_proj(attn.view(n, -1), lora)[0], layer.post_norm), lora)
        return layer.down_proj(layer.act(gate).mul_(up), lora)[0]  # in place: nothing reads gate or act(gate) again


def _add_norm(h: torch.Tensor, delta: torch.Tensor | None, norm: Any) -> torch.Tensor:
    """`h += delta` in place (when given), then `norm(h)` as the Llama RMSNorm computes it: one kernel call."""
    out = torch.empty_like(h)
    torch.ops.loraplex.add_rms_norm(h, delta, norm.weight, norm.variance_epsilon, out)
    return out


def _whole_heads(x: torch.Tensor) -> torch.Tensor:
    """`x [T, heads, D]` with D contiguous and heads adjacent (what the rotary/cache kernel reads)."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def _lean_layer(index: int, layer: Any, config) -> LeanLayer:
    attn, mlp = layer.self_attn, layer.mlp
    head_dim = int(attn.head_dim)
    window = getattr(attn, "sliding_window", None) if hasattr(attn, "sliding_window") else \
        getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
    return LeanLayer(index, layer.input_layernorm, layer.post_attention_layernorm,
                     Projections([attn.q_proj, attn.k_proj, attn.v_proj]), Projections([attn.o_proj]),
                     Projections([mlp.gate_proj, mlp.up_proj]), Projections([mlp.down_proj]), mlp.act_fn,
                     getattr(attn, "q_norm", None), getattr(attn, "k_norm", None),
                     int(config.num_attention_heads), int(config.num_key_value_heads), head_dim, float(attn.scaling),
                     AttentionOptions(int(window) if window else None))


def lean_forward_supported(paged: PagedModel, kv_cache: KVCache, decode_kernel: bool) -> str | None:
    """None when `LeanForward` can run this model, else why not."""
    model: Any = paged.model
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        return f"model type {model_type!r} is not one of {FAMILIES}"
    if kv_cache.device.type != "cpu" or kv_cache.dtype != torch.float32 or not decode_kernel:
        return "it runs on the CPU in float32 with the compiled kernels"
    rope = getattr(config, "rope_parameters", None) or {}
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        return "partial rotary"
    decoder: Any = model.get_decoder()
    for layer in getattr(decoder, "layers", ()):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, n) for n in _ATTN) or \
                not all(hasattr(mlp, n) for n in (*_MLP, "act_fn")):
            return "a decoder layer without the Llama layout"
    if not all(hasattr(decoder, n) for n in ("embed_tokens", "rotary_emb", "norm", "layers")):
        return "a decoder without the Llama layout"
    norms = [n for layer in decoder.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    if not all(isinstance(getattr(n, "variance_epsilon", None), float) and n.weight.dim() == 1 for n in norms):
        return "norms other than Llama's RMSNorm"
    return None
