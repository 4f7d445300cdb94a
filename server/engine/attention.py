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

from dataclasses import dataclass, field, fields, replace
from functools import partial
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from server.config import CpuAttentionKernel
from server.engine.kv_cache import KVCache
from server.native.loader import load_kernels

PAGED_ATTENTION = "loraplex_paged"
CPU_ATTENTION_KERNELS = get_args(CpuAttentionKernel)  # the `--cpu-attention-kernel` choices


@dataclass
class SeqSlice:
    """One scheduled sequence in a packed step.

    Its tokens occupy packed rows `[query_start, query_start + query_len)`; after this step
    it has `context_len` tokens in cache, so its new tokens sit at absolute positions
    `context_len - query_len .. context_len - 1`. `block_table` lists its KV block ids in
    token order and must cover `context_len` tokens.
    """

    query_start: int
    query_len: int
    context_len: int
    block_table: list[int]


@dataclass
class PrefillPlan:
    """One prefill chunk: packed rows `[query_start, query_start + query_len)`, at absolute positions
    `offset .. offset + query_len - 1`.

    `blocks [n_blocks]` are the cache blocks holding its whole context and `bias
    [query_len, n_blocks * block_size]` (additive: 0 or -inf) lets query i see keys
    `0 .. offset + i`. Both are None for a first chunk (`offset == 0`), which attends its own
    fresh keys causally and needs no gather. `keys_for` narrows them to a layer's sliding window.
    """

    query_start: int
    query_len: int
    offset: int
    block_size: int
    blocks: torch.Tensor | None
    bias: torch.Tensor | None
    _windowed: dict = field(default_factory=dict, init=False, repr=False)  # built once per step and window

    def keys_for(self, window: int | None, device: torch.device,
                 dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`(blocks, bias)` for a layer with sliding window `window` (None: full attention).

        Query i sees key k when `offset + i - k < window`, as transformers' sliding-window mask.
        Blocks wholly before the first query's window are left out (a long context costs a windowed
        layer its window only). A first chunk keeps `blocks` None (its keys are its own fresh ones)
        and gets a bias over them; `(None, None)` still means plain causal.
        """
        if window is None or self.offset + self.query_len <= window:
            return self.blocks, self.bias
        if window not in self._windowed:
            first_block = 0 if self.blocks is None else max(0, self.offset - window + 1) // self.block_size
            width = self.query_len if self.blocks is None else (self.blocks.numel() - first_block) * self.block_size
            keys = first_block * self.block_size + torch.arange(width, device=device)
            query = self.offset + torch.arange(self.query_len, device=device)[:, None]
            allowed = (keys <= query) & (keys > query - window)
            blocks = None if self.blocks is None else self.blocks[first_block:]
            self._windowed[window] = (blocks, _bias(allowed, dtype))
        return self._windowed[window]


@dataclass
class StepAttention:
    """Index tensors of one step, built once and shared by every layer.

    - `slot_mapping [T]`: flat cache slot (`block * block_size + offset`) of each new token.
    - `positions [T]`: absolute position of each packed token (the model's position_ids).
    - `last_rows [n_seqs]`: packed row of each sequence's last token, in input order.
    - `decode_rows [n_decode]`: packed rows of the decoding sequences (query_len == 1),
      attended in one batched call: `decode_blocks [n_decode * max_blocks]` are their
      block tables, right-padded with block 0, and `decode_lens [n_decode]` their context
      lengths. With `decode_kernel` the compiled CPU kernel reads the blocks in place
      (`loraplex::paged_decode_attention`, server/native/attention_kernels.cpp); else one
      `index_select` gathers them (a block is a contiguous chunk, far cheaper to gather than
      single slots) and `decode_bias [n_decode, 1, 1, max_blocks * block_size]` masks the
      padding (additive: 0 or -inf, which SDPA takes without converting it every layer).
    - `prefills`: one `PrefillPlan` per prefill chunk, attended one call each.
    """

    slot_mapping: torch.Tensor
    positions: torch.Tensor
    last_rows: torch.Tensor
    decode_rows: torch.Tensor
    decode_blocks: torch.Tensor
    decode_lens: torch.Tensor
    decode_bias: torch.Tensor | None
    prefills: list[PrefillPlan]
    max_context: int
    decode_kernel: bool = False
    _windowed: dict = field(default_factory=dict, init=False, repr=False)  # window -> decode bias

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.numel()

    def decode_bias_for(self, window: int | None) -> torch.Tensor:
        """`decode_bias` narrowed to a sliding window: decoding sequence i (context `L_i`) sees keys
        `L_i - window .. L_i - 1`. Built once per step and window, on the step's device."""
        if window is None or window >= self.max_context:
            return self.decode_bias
        if window not in self._windowed:
            keys = torch.arange(self.decode_bias.shape[-1], device=self.decode_bias.device)
            lens = self.decode_lens[:, None]
            self._windowed[window] = _bias((keys < lens) & (keys >= lens - window),
                                           self.decode_bias.dtype)[:, None, None, :]
        return self._windowed[window]

    @classmethod
    def build(cls, seqs: list[SeqSlice], block_size: int, device: torch.device | str,
              dtype: torch.dtype = torch.float32, decode_kernel: bool = False) -> StepAttention:
        """Plan a step; `dtype` is the model's (the masks are additive biases in it). `decode_kernel`:
        decode rows go through the compiled CPU kernel (the caller checked it is loaded and applies)."""
        _validate(seqs, block_size)
        tables = _padded_block_tables(seqs)  # [n, max_blocks], on the CPU while we index
        seq_of_token = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor([s.query_len for s in seqs]))
        positions = torch.cat([torch.arange(s.context_len - s.query_len, s.context_len) for s in seqs])
        block_of_token = tables.view(-1)[seq_of_token * tables.shape[1] + positions // block_size]
        slot_mapping = block_of_token * block_size + positions % block_size
        last_rows = torch.tensor([s.query_start + s.query_len - 1 for s in seqs])

        decode = [i for i, s in enumerate(seqs) if s.query_len == 1]
        ctx = torch.tensor([seqs[i].context_len for i in decode], dtype=torch.long)
        n_blocks = -(-int(ctx.max()) // block_size) if decode else 0
        decode_bias = None
        if not decode_kernel:
            key_pos = torch.arange(n_blocks * block_size)
            decode_bias = _bias(key_pos[None, :] < ctx[:, None], dtype)[:, None, None, :]

        prefills = [_prefill_plan(s, tables[i], block_size, dtype) for i, s in enumerate(seqs) if s.query_len > 1]
        step = cls(slot_mapping, positions, last_rows, last_rows[decode], tables[decode, :n_blocks].reshape(-1),
                   ctx, decode_bias, [_to_device(p, device) for p in prefills], max(s.context_len for s in seqs),
                   decode_kernel)
        return _to_device(step, device)  # built on the CPU, moved once per step


def _bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))


def _to_device(obj, device: torch.device | str):
    """`obj` (a dataclass) with every tensor field moved to `device`."""
    moved = {f.name: v.to(device) for f in fields(obj) if isinstance(v := getattr(obj, f.name), torch.Tensor)}
    return replace(obj, **moved)


def _validate(seqs: list[SeqSlice], block_size: int) -> None:
    if not seqs:
        raise ValueError("a step needs at least one sequence")
    expected_start = 0
    for s in seqs:
        if s.query_start != expected_start or not 1 <= s.query_len <= s.context_len:
            raise ValueError(f"bad packing for {s}: expected query_start {expected_start}, 1 <= query_len <= context_len")
        if len(s.block_table) * block_size < s.context_len:
            raise ValueError(f"block table of {len(s.block_table)} blocks cannot hold {s.context_len} tokens")
        expected_start += s.query_len


def _padded_block_tables(seqs: list[SeqSlice]) -> torch.Tensor:
    width = max(len(s.block_table) for s in seqs)
    return torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.long)


def _prefill_plan(s: SeqSlice, table: torch.Tensor, block_size: int, dtype: torch.dtype) -> PrefillPlan:
    offset = s.context_len - s.query_len
    if offset == 0:
        return PrefillPlan(s.query_start, s.query_len, 0, block_size, None, None)
    n_blocks = -(-s.context_len // block_size)
    allowed = torch.arange(n_blocks * block_size)[None, :] <= offset + torch.arange(s.query_len)[:, None]
    return PrefillPlan(s.query_start, s.query_len, offset, block_size, table[:n_blocks].clone(), _bias(allowed, dtype))


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
    step, cache, layer = paged_step.step, paged_step.kv_cache, module.layer_idx
    if query.shape[0] != 1 or query.shape[2] != step.num_tokens:
        raise ValueError(f"expected packed query [1, H, {step.num_tokens}, D], got {list(query.shape)}")
    options = AttentionOptions.from_kwargs(kwargs)
    scale = query.shape[3] ** -0.5 if scaling is None else scaling
    cache.flat_keys(layer).index_copy_(1, step.slot_mapping, key[0].to(cache.dtype))
    cache.flat_values(layer).index_copy_(1, step.slot_mapping, value[0].to(cache.dtype))

    out = query.new_empty(step.num_tokens, query.shape[1], query.shape[3])  # [T, H, D]
    if step.decode_rows.numel():
        decode = _decode_attention_kernel if step.decode_kernel else _decode_attention
        out[step.decode_rows] = decode(query, cache, layer, step, scale, options)
    for plan in step.prefills:
        rows = slice(plan.query_start, plan.query_start + plan.query_len)
        out[rows] = _prefill_attention(query[:, :, rows], key[:, :, rows], value[:, :, rows],
                                       cache, layer, plan, scale, options)
    return out.unsqueeze(0), None


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


def _decode_attention_kernel(query: torch.Tensor, cache: KVCache, layer: int, step: StepAttention,
                             scale: float, options: AttentionOptions) -> torch.Tensor:
    """The same, by the compiled kernel: each sequence's blocks read where they lie, over its own window."""
    q = query[0, :, step.decode_rows].transpose(0, 1)  # [n_decode, num_heads, head_dim]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    tables = step.decode_blocks.view(step.decode_rows.numel(), -1)
    sinks = None if options.sinks is None else options.sinks.detach().float().contiguous()
    torch.ops.loraplex.paged_decode_attention(q, cache.keys[layer], cache.values[layer], tables, step.decode_lens,
                                              scale, options.window or 0, options.softcap or 0.0, sinks, out)
    return out


def decode_kernel_applies(device: torch.device, dtype: torch.dtype, choice: CpuAttentionKernel) -> bool:
    """Whether decode attention runs the compiled CPU kernel (float32 on the CPU): `choice` "auto" uses it
    when it builds, "compiled" requires it (RuntimeError otherwise), "torch" never builds it."""
    if choice not in CPU_ATTENTION_KERNELS:
        raise ValueError(f"choice must be one of {CPU_ATTENTION_KERNELS}, got {choice!r}")
    if device.type != "cpu" or dtype != torch.float32 or choice == "torch":
        return False
    if load_kernels():
        return True
    if choice == "compiled":
        raise RuntimeError("--cpu-attention-kernel compiled: the CPU kernels could not be built (see the log)")
    return False


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
        bias = _bias(torch.ones(length, length, dtype=torch.bool, device=q.device).tril(), q.dtype)
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

    model: nn.Module
    attention_modules: tuple[nn.Module, ...]


def use_paged_attention(model: nn.Module) -> PagedModel:
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
    slices, tokens = [], []
    for ids, context_len, table in seqs:
        slices.append(SeqSlice(len(tokens), len(ids), context_len, table))
        tokens.extend(ids)
    return slices, tokens


@torch.inference_mode()
def packed_forward(paged: PagedModel, kv_cache: KVCache, seqs: list[tuple[list[int], int, list[int]]],
                   decode_kernel: bool = False) -> torch.Tensor:
    """One packed forward pass; returns the logits of each sequence's last token `[n_seqs, vocab]`.

    `seqs` are `(token_ids_this_step, context_len_after, block_table)`. LoRA slot indices etc.
    are set by the caller.
    """
    slices, tokens = pack(seqs)
    step = StepAttention.build(slices, kv_cache.block_size, kv_cache.device, kv_cache.dtype, decode_kernel)
    return forward_step(paged, kv_cache, step, torch.tensor(tokens, dtype=torch.long, device=kv_cache.device))


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
        return _finish_logits(model.config, head(hidden.last_hidden_state[0, step.last_rows]))
    finally:
        for hook in hooks:
            hook.remove()


def _finish_logits(config, logits: torch.Tensor) -> torch.Tensor:
    # The few heads that do more than a Linear (Cohere, Granite, Gemma 2/3): mirror their CausalLM forward.
    if getattr(config, "logit_scale", None) is not None:
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None) is not None:
        logits = logits / config.logits_scaling
    if getattr(config, "final_logit_softcapping", None) is not None:
        logits = torch.tanh(logits / config.final_logit_softcapping) * config.final_logit_softcapping
    return logits
