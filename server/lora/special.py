"""Slot layers for the two modules that are not plain linear layers of the decoder: the output layer
(lm_head) and the input embedding. Each is wrapped on the first adapter that changes it, and its LoRA
buffers are allocated on the first adapter with LoRA there, so a server whose adapters only replace
weights (or never touch these modules) holds no LoRA buffers for them.

- `LoraHead`: LoRA (and DoRA) as any linear layer, on the rows the output layer sees, which in the
  engine are only each sequence's sampled rows (`StepState.head_meta`); then the adapters' replaced
  weights (a trained copy of the layer, or trainable token rows).
- `LoraEmbedding`: token `i` gets `s·B[slot]·A[slot][:, id_i]` added (PEFT's lora_embedding_A
  [r, vocab] / lora_embedding_B [dim, r]): the shrink is a gather of A's column for each token, the
  expand the op's own, through whichever backend runs the rest. Then replaced rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from server.lora.layers import LoraGroup, LoraLinear, StepState, _ShrinkCache, pool_offset, pooled
from server.lora.ops import Backend
from server.lora.pool import AdapterPool, PooledWeight
from server.lora.ranks import WeightRanks
from server.lora.replacements import Replacement, Replacements
from server.lora.step import LoraStepMeta


class EmbeddingGroup(LoraGroup):
    """The embedding's A, kept as `a_storage [S, vocab, R]` (a token's rank vector is one contiguous row);
    `lora_a` is the usual `[S, R, vocab]` view that slot writes go through. In the adapter pool, A is a
    token-major block `[vocab, rank]` per adapter."""

    def __init__(self, vocab: int, max_loras: int, max_rank: int, device: torch.device, dtype: torch.dtype,
                 compute_dtype: torch.dtype, backend: Backend, pool: AdapterPool | None = None) -> None:
        nn.Module.__init__(self)
        self.members, self.max_rank, self.backend = 1, max_rank, backend
        self.a_transposed, self.vocab, self.compute_dtype = True, vocab, compute_dtype
        self.in_features, self.pool = vocab, pool
        self.ranks = WeightRanks(1, max_loras, device)
        self._cache = _ShrinkCache()
        if pool is not None:
            self.op_a = PooledWeight(pool, 1, max_rank, max_rank)  # `row` unused: blocks are [vocab, rank]
            return
        self.register_buffer("a_storage", torch.zeros(max_loras, vocab, max_rank, device=device, dtype=dtype),
                             persistent=False)
        self.op_a = self.lora_a

    def write_a(self, row: int, member: int, a: torch.Tensor, rel: int | None) -> None:
        if self.pool is None:
            super().write_a(row, member, a, rel)
            return
        pooled(self.op_a).place(0, row, pool_offset(rel))
        self._table(row, a.shape[0]).copy_(a.t())

    def _table(self, slot: int, rank: int) -> torch.Tensor:
        """A pooled adapter's `[vocab, rank]` block."""
        pool = pooled(self.op_a).pool
        return pool.view(pool.base_host[slot] + pooled(self.op_a).rel_host[0][slot], self.vocab, rank)

    def shrink(self, x: torch.Tensor, meta: LoraStepMeta) -> Any:
        """`t [N, R]`: row `slot(i) * vocab + id_i` of the flattened A for token ids `x [..., N]`."""
        self._cache.computed += 1
        if self.pool is not None:
            return self.backend.from_dense(self._pooled_rows(x.reshape(-1), meta), meta)
        index = meta.token_slots.clamp(min=0) * self.vocab + x.reshape(-1)
        t = self.a_storage.view(-1, self.max_rank).index_select(0, index).to(self.compute_dtype)
        return self.backend.from_dense(t, meta)

    def _pooled_rows(self, ids: torch.Tensor, meta: LoraStepMeta) -> torch.Tensor:
        """Each token's rank vector from its adapter's block, one gather per adapter of the step."""
        t = torch.zeros(meta.num_tokens, self.max_rank, device=ids.device, dtype=self.compute_dtype)
        rows_of: dict[int, list[int]] = {}
        for i, slot in enumerate(meta.host_slots):
            if slot >= 0 and self.ranks.group.host[0][slot]:
                rows_of.setdefault(slot, []).append(i)
        for slot, rows in rows_of.items():
            rank = self.ranks.group.host[0][slot]
            index = torch.tensor(rows, device=ids.device)
            t[index, :rank] = self._table(slot, rank).index_select(0, ids.index_select(0, index)).to(t.dtype)
        return t


class _SpecialLayer(nn.Module):
    """A wrapped module with optional LoRA (`lora`, built on first use) and replaced weights per slot row."""

    def __init__(self, base: nn.Module, max_loras: int, max_rank: int, dtype: torch.dtype, backend: Backend,
                 state: StepState, pool: AdapterPool | None = None) -> None:
        super().__init__()
        # nn.Linear, nn.Embedding or a quantized linear: read for the attributes its kind has.
        self.base: Any = base
        self.state, self.pool = state, pool
        self.max_loras, self.max_rank, self.dtype, self.backend = max_loras, max_rank, dtype, backend
        self.lora: LoraLinear | None = None
        self.replacements = Replacements()

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def users(self) -> int:
        """Bitmask of slot rows whose adapter changes this module."""
        return (0 if self.lora is None else self.lora.group.ranks.masks[0]) | self.replacements.mask

    def lora_layer(self) -> LoraLinear:
        """The LoRA layer here, built on first use."""
        if self.lora is None:
            self.lora = self._build_lora()
        return self.lora

    @torch.no_grad()
    def write_slot(self, row: int, weights: Any | None, replaced: Replacement | None,
                   at: tuple[int, int] | None = None) -> None:
        """Slot `row` takes an adapter's LoRA here (`LoraModuleWeights` or None; `at`: its blocks' offsets
        in the adapter pool) and replaced weights."""
        if weights is not None:
            self.lora_layer().write_slot(row, weights.a, weights.b, weights.scale * self._lora_factor(),
                                         weights.magnitude, at)
        elif self.lora is not None:
            self.lora.clear_slot(row)
        self.replacements.set(row, replaced)

    def clear_slot(self, row: int) -> None:
        self.write_slot(row, None, None)

    def move_rows(self, dst: list[int], src: list[int], dst_t: torch.Tensor, src_t: torch.Tensor) -> None:
        """Rows `dst` take what rows `src` held (the model's row moves)."""
        if self.lora is not None:
            for buf in (self.lora.group.a_storage, self.lora.b_storage):
                buf.index_copy_(0, dst_t, buf.index_select(0, src_t))
            self.lora.group.ranks.move_rows(dst_t, src_t)
            if self.lora.dora is not None:
                self.lora.dora.move_rows(dst, src)
        self.replacements.move_rows(dst, src)

    def nbytes(self) -> tuple[int, int, int]:
        """(LoRA buffers, DoRA vectors, replaced weights) held on the device."""
        if self.lora is None:
            return 0, 0, self.replacements.nbytes
        # In the pool, the LoRA blocks are counted with the pool.
        lora = 0 if self.pool is not None else self.lora.group.a_storage.nbytes + self.lora.b_storage.nbytes
        return lora, 0 if self.lora.dora is None else self.lora.dora.excess.nbytes, self.replacements.nbytes

    def _build_lora(self) -> LoraLinear:
        raise NotImplementedError

    def _lora_factor(self) -> float:
        return 1.0


class LoraHead(_SpecialLayer):
    """The output layer with slots: LoRA (and DoRA) as any linear layer, then replaced weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state, rows = self.state, x.numel() // self.base.in_features
        head = state.head_meta  # the engine runs the layer on the sampled rows only
        meta = head if head is not None and head.num_tokens == rows else state.meta
        y = self.base(x)
        if self.lora is not None:
            y = self.lora.add_lora(y, x, meta)
        if meta is not None and meta.row_mask & self.replacements.mask:
            y = y.contiguous()
            self.replacements.linear_(y.view(-1, self.base.out_features), x.reshape(-1, self.base.in_features), meta)
        return y

    def _build_lora(self) -> LoraLinear:
        base = self.base
        group = LoraGroup(1, base.in_features, self.max_loras, self.max_rank, base.weight.device, self.dtype,
                          self.backend, self.pool)
        layer = LoraLinear(base, base.in_features, base.out_features, group, 0, self.state)
        layer.head_group = group  # registered with the layer: the model's `groups` hold the decoder's only
        return layer


class LoraEmbedding(_SpecialLayer):
    """The input embedding with slots; its LoRA's `in_features` is the vocabulary, `out_features` the width."""

    def __init__(self, base: nn.Module, *args: Any) -> None:
        super().__init__(base, *args)
        scale = getattr(base, "embed_scale", None)  # Gemma-style embeddings scale their output
        self.output_scale = None if scale is None else torch.as_tensor(scale, device=self.weight.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        meta = self.state.meta
        y = self.base(ids)
        if self.lora is not None:
            y = self.lora.add_lora(y, ids, meta)
        if meta is not None and meta.row_mask & self.replacements.mask:
            y = y.contiguous()
            self.replacements.embed_(y.view(-1, self.base.embedding_dim), ids.reshape(-1), meta, self.output_scale)
        return y

    def write_slot(self, row: int, weights: Any | None, replaced: Replacement | None,
                   at: tuple[int, int] | None = None) -> None:
        if weights is not None and weights.magnitude is not None:
            raise ValueError("DoRA on the input embedding is not served")  # refused when parsed
        super().write_slot(row, weights, replaced, at)

    def _build_lora(self) -> LoraLinear:
        base = self.base
        group = EmbeddingGroup(base.num_embeddings, self.max_loras, self.max_rank, base.weight.device, self.dtype,
                               base.weight.dtype, self.backend, self.pool)
        layer = LoraLinear(base, base.num_embeddings, base.embedding_dim, group, 0, self.state)
        layer.embedding_group = group
        return layer

    def _lora_factor(self) -> float:
        # The embedding's own output scale applies to the LoRA delta too (as PEFT applies it).
        return 1.0 if self.output_scale is None else float(self.output_scale)


def replacement(rows: torch.Tensor, indices: torch.Tensor | None, like: torch.Tensor) -> Replacement:
    """A replacement on `like`'s device and dtype (the base weight it stands in for)."""
    return Replacement(rows.to(like.device, like.dtype).contiguous(),
                       None if indices is None else indices.to(like.device))
