"""The plan of one packed step: which packed rows belong to which sequence, where their keys and values go in
the paged cache, and what each decode row and prefill chunk attends (`StepAttention`, built once per step and
shared by every layer; server/engine/attention.py attends by it)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


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
            self._windowed[window] = (blocks, additive_bias(allowed, dtype))
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
        bias = self.decode_bias
        if bias is None:
            raise RuntimeError("the step was planned for the decode kernel, which builds no decode bias")
        if window is None or window >= self.max_context:
            return bias
        if window not in self._windowed:
            keys = torch.arange(bias.shape[-1], device=bias.device)
            lens = self.decode_lens[:, None]
            self._windowed[window] = additive_bias((keys < lens) & (keys >= lens - window), bias.dtype)[:, None, None, :]
        return self._windowed[window]

    @classmethod
    def build(cls, seqs: list[SeqSlice], block_size: int, device: torch.device | str,
              dtype: torch.dtype = torch.float32, decode_kernel: bool = False) -> StepAttention:
        """Plan a step; `dtype` is the model's (the masks are additive biases in it). `decode_kernel`:
        decode rows go through the compiled CPU kernel (the caller checked it is loaded and applies)."""
        _validate(seqs, block_size)
        if all(s.query_len == 1 for s in seqs):
            return cls._build_decode(seqs, block_size, device, dtype, decode_kernel)
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
            decode_bias = additive_bias(key_pos[None, :] < ctx[:, None], dtype)[:, None, None, :]

        prefills = [_prefill_plan(s, tables[i], block_size, dtype) for i, s in enumerate(seqs) if s.query_len > 1]
        step = cls(slot_mapping, positions, last_rows, last_rows[decode], tables[decode, :n_blocks].reshape(-1),
                   ctx, decode_bias, [_to_device(p, device) for p in prefills], max(s.context_len for s in seqs),
                   decode_kernel)
        return _to_device(step, device)  # built on the CPU, moved once per step

    @classmethod
    def _build_decode(cls, seqs: list[SeqSlice], block_size: int, device: torch.device | str,
                      dtype: torch.dtype, decode_kernel: bool) -> StepAttention:
        """`build` for a step of decode rows only (every single-stream step): the same tensors from Python
        ints, a few constructions instead of a dozen small ops (some 0.2 ms a step on one core)."""
        lens = [s.context_len for s in seqs]
        n_blocks = -(-max(lens) // block_size)
        positions = [n - 1 for n in lens]
        slots = [s.block_table[p // block_size] * block_size + p % block_size for s, p in zip(seqs, positions)]
        blocks = [b for s in seqs for b in (s.block_table + [0] * n_blocks)[:n_blocks]]
        rows = torch.arange(len(seqs))
        ctx = torch.tensor(lens, dtype=torch.long)
        decode_bias = None
        if not decode_kernel:
            decode_bias = additive_bias(torch.arange(n_blocks * block_size)[None, :] < ctx[:, None], dtype)[:, None, None, :]
        step = cls(torch.tensor(slots, dtype=torch.long), torch.tensor(positions, dtype=torch.long), rows, rows,
                   torch.tensor(blocks, dtype=torch.long), ctx, decode_bias, [], max(lens), decode_kernel)
        return _to_device(step, device)


def additive_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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
    return PrefillPlan(s.query_start, s.query_len, offset, block_size, table[:n_blocks].clone(),
                       additive_bias(allowed, dtype))
