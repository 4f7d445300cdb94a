"""Packed multi-sequence attention over the engine's paged KV cache.

One step runs ONE forward pass over `T` packed tokens: `input_ids` / `position_ids` of
shape `[1, T]` are the concatenation of every scheduled sequence's tokens for this step
(a prefill chunk, or exactly one token for a decoding sequence). Attention goes through
`transformers.AttentionInterface` under the name `PAGED_ATTENTION`, so any causal LM whose
attention modules call that interface (Llama, Qwen2, Mistral, ...) works unchanged:

    paged = use_paged_attention(model)              # once, after loading: the model and its attention modules
    step = StepAttention.build(slices, kv_cache.block_size, device, kv_cache.dtype)  # per step
    forward_step(paged, kv_cache, step, input_ids)  # last-token logits

`forward_step` hands the step's `StepContext` to every attention module for the length of one forward
(a keyword argument added by a forward pre-hook), so it reaches the attention function whatever the
decoder layers in between do with their keyword arguments, and nothing outlives the call. transformers
builds no mask for an implementation missing from `AttentionMaskInterface` (`attention_mask` is None
here), and `use_cache=False` keeps it from creating a DynamicCache: the engine's `KVCache` is the only
cache.

Per layer, the attention function takes what the modeling code passes: `sliding_window` (Mistral,
Qwen2, Gemma 2/3: key k visible from query q when `q - k < window`), `softcap` (Gemma 2: scores become
`softcap * tanh(scores / softcap)` before the mask) and `s_aux` (gpt-oss: one sink logit per head that
joins each softmax's denominator and attends nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedModel

# Names other modules import from here live in the decode kernel's and the step plan's modules.
from server.engine.decode_kernel import CPU_ATTENTION_KERNELS as CPU_ATTENTION_KERNELS
from server.engine.decode_kernel import decode_attention_kernel
from server.engine.decode_kernel import decode_kernel_applies as decode_kernel_applies
from server.engine.kv_cache import KVCache
from server.engine.step_plan import PrefillPlan as PrefillPlan
from server.engine.step_plan import SeqSlice as SeqSlice
from server.engine.step_plan import StepAttention, additive_bias

PAGED_ATTENTION = "loraplex_paged"
# A step's forward besides `forward_step`: (kv_cache, step, input_ids [T]) -> logits of `step.last_rows`.
StepForward = Callable[[KVCache, StepAttention, torch.Tensor], torch.Tensor]


@dataclass
class StepContext:
    """What the paged attention function needs for one forward: the cache and the step's plan.

    `forward_step` adds it as the keyword argument `paged_step` to every attention module's call, and
    the modeling code passes it on to the attention function with the layer's other arguments.
    """

    kv_cache: KVCache
    step: StepAttention


@dataclass(frozen=True)
class AttentionOptions:
    """One layer's attention variant, from the keyword arguments its modeling code passes."""

    window: int | None = None          # sliding window (None: full attention)
    softcap: float | None = None       # scores -> softcap * tanh(scores / softcap)
    sinks: torch.Tensor | None = None  # [num_heads] sink logits

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> AttentionOptions:
        window, softcap, sinks = kwargs.get("sliding_window"), kwargs.get("softcap"), kwargs.get("s_aux")
        return cls(int(window) if window else None, float(softcap) if softcap else None, sinks)

    @property
    def plain(self) -> bool:
        """No softcap and no sinks: SDPA computes it."""
        return self.softcap is None and self.sinks is None


def paged_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None,
                            dropout: float = 0.0, paged_step: StepContext | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """AttentionInterface function: write this step's K/V to the cache, attend every sequence.

    Args: `query [1, num_heads, T, head_dim]`, `key`/`value [1, num_kv_heads, T, head_dim]`
    (rotary already applied), `module.layer_idx` picks the cache layer, `scaling` the softmax
    scale (None: 1/sqrt(head_dim)). `attention_mask` and `dropout` are ignored: the mask is
    implied by the step's sequences, and this is inference only.
    Returns `(attn_output [1, T, num_heads, head_dim], None)`, the layout the modeling code
    reshapes to `[1, T, hidden]`. `paged_step` is the step's `StepContext`.
    """
    if paged_step is None:
        raise RuntimeError(f"{PAGED_ATTENTION} attention called without paged_step (use forward_step)")
    # Every module handed a step has its cache layer's index (use_paged_attention picks them by it).
    step, cache, layer = paged_step.step, paged_step.kv_cache, cast(int, module.layer_idx)
    if query.shape[0] != 1 or query.shape[2] != step.num_tokens:
        raise ValueError(f"expected packed query [1, H, {step.num_tokens}, D], got {list(query.shape)}")
    options = AttentionOptions.from_kwargs(kwargs)
    scale = query.shape[3] ** -0.5 if scaling is None else scaling
    cache.flat_keys(layer).index_copy_(1, step.slot_mapping, key[0].to(cache.dtype))
    cache.flat_values(layer).index_copy_(1, step.slot_mapping, value[0].to(cache.dtype))
    return attend_written(query, key, value, cache, layer, step, scale, options).unsqueeze(0), None


def attend_written(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: KVCache, layer: int,
                   step: StepAttention, scale: float, options: AttentionOptions) -> torch.Tensor:
    """Every sequence of the step attended, this step's K/V already in the cache: `query [1, H, T, D]`,
    `key`/`value [1, KVH, T, D]` (a first prefill chunk attends them as they are) -> `[T, H, D]`."""
    out = query.new_empty(step.num_tokens, query.shape[1], query.shape[3])  # [T, H, D]
    if step.decode_rows.numel():
        decode = decode_attention_kernel if step.decode_kernel else _decode_attention
        out[step.decode_rows] = decode(query, cache, layer, step, scale, options)
    for plan in step.prefills:
        rows = slice(plan.query_start, plan.query_start + plan.query_len)
        out[rows] = _prefill_attention(query[:, :, rows], key[:, :, rows], value[:, :, rows],
                                       cache, layer, plan, scale, options)
    return out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
            options: AttentionOptions, sinks: torch.Tensor | None) -> torch.Tensor:
    """Attention with the scores materialised, for softcaps and sinks (which SDPA does not take).

    `q [B, G, Lq, D]` against `k`/`v [B, 1 or G, Lk, D]`, additive `bias` broadcastable to
    `[B, G, Lq, Lk]`, `sinks` broadcastable to `[B, G, Lq, 1]` or None; returns `[B, G, Lq, D]`.
    The order is the modeling code's: scale, softcap, mask, softmax in float32 (with the sink).
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if options.softcap is not None:
        scores = torch.tanh(scores / options.softcap) * options.softcap
    scores = (scores + bias).float()
    if sinks is not None:
        sink = sinks.float().expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs.to(v.dtype), v)


def _decode_attention(query: torch.Tensor, cache: KVCache, layer: int, step: StepAttention,
                      scale: float, options: AttentionOptions) -> torch.Tensor:
    """All decoding sequences in two batched matmuls; returns `[n_decode, num_heads, head_dim]`.

    GQA without repeating K/V: query head h uses kv head h // group, so the `group` query
    heads of a kv head become `group` query rows against that head's keys. The gathered keys
    are `[kv_heads * n, L, D]` matrices as they lie, so `bmm` reads them without the copy
    SDPA's strided path made (2.3x faster per layer at 64 sequences x 200 tokens, measured).
    """
    n, heads, head_dim = step.decode_rows.numel(), query.shape[1], query.shape[3]
    kv_heads = cache.num_kv_heads
    group = heads // kv_heads
    q = query[0, :, step.decode_rows].view(kv_heads, group, n, head_dim).transpose(1, 2).reshape(-1, group, head_dim)
    index = cache.gather_index(step.decode_blocks)
    k = cache.gather(cache.keys[layer], index, n, "keys").view(kv_heads * n, -1, head_dim).to(q.dtype)
    v = cache.gather(cache.values[layer], index, n, "values").view(kv_heads * n, -1, head_dim).to(q.dtype)
    bias = step.decode_bias_for(options.window)
    bias = bias.view(1, n, 1, -1).expand(kv_heads, n, 1, -1).reshape(kv_heads * n, 1, -1).to(q.dtype)
    if options.plain:
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
        o = torch.bmm(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)  # [kv_heads * n, group, D]
    else:  # query head h = kv_head * group + g: its sink, in the [kv_heads * n, group, 1] layout
        sinks = None if options.sinks is None else \
            options.sinks.view(kv_heads, 1, group, 1).expand(kv_heads, n, group, 1).reshape(kv_heads * n, group, 1)
        o = _attend(q, k, v, bias, scale, options, sinks)
    return o.view(kv_heads, n, group, head_dim).transpose(0, 1).reshape(n, heads, head_dim)


def _prefill_attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: KVCache, layer: int,
                       plan: PrefillPlan, scale: float, options: AttentionOptions) -> torch.Tensor:
    """One prefill chunk, causal with offset (and the layer's window); `q [1, H, L, D]` -> `[L, H, D]`."""
    blocks, bias = plan.keys_for(options.window, q.device, q.dtype)
    if blocks is None:  # the chunk is the whole context: its fresh K/V are all we need
        k, v = key, value
    else:
        index = cache.gather_index(blocks)
        k = cache.gather(cache.keys[layer], index, 1, "keys").transpose(0, 1).to(q.dtype)  # [1, kv_heads, L, D]
        v = cache.gather(cache.values[layer], index, 1, "values").transpose(0, 1).to(q.dtype)
    if options.plain:
        mask = None if bias is None else bias.to(q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=bias is None, scale=scale,
                                           enable_gqa=True)
    else:
        o = _prefill_attend(q, k, v, bias, scale, options)
    return o[0].transpose(0, 1)


def _prefill_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
                    options: AttentionOptions) -> torch.Tensor:
    """A chunk with softcap or sinks: query heads grouped by kv head (GQA without repeating K/V)."""
    _, heads, length, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    if bias is None:  # a first chunk, plain causal
        bias = additive_bias(torch.ones(length, length, dtype=torch.bool, device=q.device).tril(), q.dtype)
    qg = q.view(kv_heads, group, length, head_dim)
    sinks = None if options.sinks is None else options.sinks.view(kv_heads, group, 1, 1)
    o = _attend(qg, k[0][:, None], v[0][:, None], bias.to(q.dtype), scale, options, sinks)
    return o.reshape(1, heads, length, head_dim)


AttentionInterface.register(PAGED_ATTENTION, paged_attention_forward)


class UnsupportedModelError(RuntimeError):
    """The engine cannot serve this model exactly; the message names the architecture and why."""


@dataclass(frozen=True)
class PagedModel:
    """A causal LM switched to the paged attention function, and the attention modules of its layers
    (those the step context is handed to)."""

    model: PreTrainedModel
    attention_modules: tuple[nn.Module, ...]


def use_paged_attention(model: PreTrainedModel) -> PagedModel:
    """Switch a loaded transformers model (and its sub-models) to the paged attention function.

    This sets `model.config._attn_implementation`: a config object shared with another model
    (two `from_config` calls on one config) switches that model too. The attention modules are the
    modules with a `layer_idx` (the cache layer they read) whose class is an attention class.
    """
    arch = type(model).__name__
    try:
        model.set_attn_implementation(PAGED_ATTENTION)
    except (ValueError, NotImplementedError) as exc:
        raise UnsupportedModelError(f"{arch} cannot be served: {exc}") from exc
    if model.config._attn_implementation != PAGED_ATTENTION:
        raise UnsupportedModelError(f"{arch} cannot be served: its attention does not go through transformers' "
                                    "AttentionInterface")
    modules = tuple(m for m in model.modules()
                    if isinstance(getattr(m, "layer_idx", None), int) and "attention" in type(m).__name__.lower())
    layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    if not modules or (layers is not None and len(modules) != layers):
        raise UnsupportedModelError(f"{arch} cannot be served: {len(modules)} of its {layers} layers are attention "
                                    "layers; the others (recurrent or state-space) keep a state the paged KV cache "
                                    "does not hold")
    return PagedModel(model, modules)


def _hand_step(context: StepContext, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: the attention module's call gets the step's context among its keyword arguments."""
    kwargs["paged_step"] = context
    return args, kwargs


def pack(seqs: list[tuple[list[int], int, list[int]]]) -> tuple[list[SeqSlice], list[int]]:
    """SeqSlices and the flat token ids of `(token_ids_this_step, context_len_after, block_table)` tuples."""
    slices: list[SeqSlice] = []
    tokens: list[int] = []
    for ids, context_len, table in seqs:
        slices.append(SeqSlice(len(tokens), len(ids), context_len, table))
        tokens.extend(ids)
    return slices, tokens


@torch.inference_mode()
def packed_forward(paged: PagedModel, kv_cache: KVCache, seqs: list[tuple[list[int], int, list[int]]],
                   decode_kernel: bool = False, forward: StepForward | None = None) -> torch.Tensor:
    """One packed forward pass; returns the logits of each sequence's last token `[n_seqs, vocab]`.

    `seqs` are `(token_ids_this_step, context_len_after, block_table)`. LoRA slot indices etc.
    are set by the caller. `forward`: another forward of the same step (the lean decoder), instead of the
    model's own through `forward_step`.
    """
    slices, tokens = pack(seqs)
    step = StepAttention.build(slices, kv_cache.block_size, kv_cache.device, kv_cache.dtype, decode_kernel)
    ids = torch.tensor(tokens, dtype=torch.long, device=kv_cache.device)
    return forward_step(paged, kv_cache, step, ids) if forward is None else forward(kv_cache, step, ids)


def forward_step(paged: PagedModel, kv_cache: KVCache, step: StepAttention, input_ids: torch.Tensor) -> torch.Tensor:
    """The forward of a planned step over packed `input_ids [T]`; last-token logits `[n_seqs, vocab]`.

    The output head runs on the last-token hidden states only, not on all T packed tokens.
    """
    model, hand = paged.model, partial(_hand_step, StepContext(kv_cache, step))
    hooks = [m.register_forward_pre_hook(hand, with_kwargs=True) for m in paged.attention_modules]
    try:
        head = model.get_output_embeddings()
        kwargs = {"input_ids": input_ids[None], "position_ids": step.positions[None], "use_cache": False}
        if head is None:  # no separable head: run it all, then keep the last rows
            return model(**kwargs).logits[0, step.last_rows]
        hidden = model.get_decoder()(**kwargs)
        return finish_logits(model.config, head(hidden.last_hidden_state[0, step.last_rows]))
    finally:
        for hook in hooks:
            hook.remove()


def finish_logits(config, logits: torch.Tensor) -> torch.Tensor:
    # The few heads that do more than a Linear (Cohere, Granite, Gemma 2/3): mirror their CausalLM forward.
    if getattr(config, "logit_scale", None) is not None:
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None) is not None:
        logits = logits / config.logits_scaling
    if getattr(config, "final_logit_softcapping", None) is not None:
        logits = torch.tanh(logits / config.final_logit_softcapping) * config.final_logit_softcapping
    return logits
