"""LoRA layers for the two modules that are not plain linear layers of the decoder: the output layer
(lm_head) and the input embedding. Both are wrapped on the first adapter that needs them, so a
server whose adapters never touch them holds no buffers for them.

- `LoraHead`: a `LoraLinear` of its own group that runs on the rows the output layer sees, which
  in the engine are only each sequence's sampled rows (`StepState.head_meta`), then applies the
  adapters' replaced weights (a trained copy of the layer, or trainable token rows).
- `LoraEmbedding`: token `i` gets `s·B[slot]·A[slot][:, id_i]` added (PEFT's lora_embedding_A
  [r, vocab] / lora_embedding_B [dim, r]): the shrink is a gather of A's column for each token,
  the expand the op's own, through whichever backend runs the rest. Then replaced rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from server.lora.layers import LoraGroup, LoraLinear, StepState, _ShrinkCache
from server.lora.ops import Backend
from server.lora.ranks import WeightRanks
from server.lora.replacements import Replacement, Replacements
from server.lora.step import LoraStepMeta


class EmbeddingGroup(LoraGroup):
    """The embedding's A, kept as `a_storage [S, vocab, R]` (a token's rank vector is one contiguous row);
    `lora_a` is the usual `[S, R, vocab]` view that slot writes go through."""

    def __init__(self, vocab: int, max_loras: int, max_rank: int, device: torch.device, dtype: torch.dtype,
                 compute_dtype: torch.dtype, backend: Backend) -> None:
        nn.Module.__init__(self)
        self.members, self.max_rank, self.backend = 1, max_rank, backend
        self.a_transposed, self.vocab, self.compute_dtype = True, vocab, compute_dtype
        self.register_buffer("a_storage", torch.zeros(max_loras, vocab, max_rank, device=device, dtype=dtype),
                             persistent=False)
        self.op_a = self.lora_a
        self.ranks = WeightRanks(1, max_loras, device)
        self._cache = _ShrinkCache()

    def shrink(self, x: torch.Tensor, meta: LoraStepMeta) -> Any:
        """`t [N, R]`: row `slot(i) * vocab + id_i` of the flattened A for token ids `x [..., N]`."""
        index = meta.token_slots.clamp(min=0) * self.vocab + x.reshape(-1)
        t = self.a_storage.view(-1, self.max_rank).index_select(0, index).to(self.compute_dtype)
        self._cache.computed += 1
        return self.backend.from_dense(t, meta)


class LoraHead(LoraLinear):
    """The output layer with slots: LoRA (and DoRA) as any linear layer, then replaced weights."""

    def __init__(self, base: nn.Linear, max_loras: int, max_rank: int, dtype: torch.dtype, backend: Backend,
                 state: StepState) -> None:
        group = LoraGroup(1, base.in_features, max_loras, max_rank, base.weight.device, dtype, backend)
        super().__init__(base, base.in_features, base.out_features, group, 0, state)
        self.head_group = group  # a submodule here: the model's groups list holds the decoder's only
        self.replacements = Replacements()

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state, rows = self.state, x.numel() // self.in_features
        head = state.head_meta  # the engine runs the layer on the sampled rows only
        meta = head if head is not None and head.num_tokens == rows else state.meta
        y = self.add_lora(self.base(x), x, meta)
        if meta is not None and meta.row_mask & self.replacements.mask:
            y = y.contiguous()
            self.replacements.linear_(y.view(-1, self.out_features), x.reshape(-1, self.in_features), meta)
        return y

    def users(self) -> int:
        """Bitmask of slot rows whose adapter changes this layer."""
        return self._masks[0] | self.replacements.mask


class LoraEmbedding(LoraLinear):
    """The input embedding with slots; `in_features` is the vocabulary, `out_features` the width."""

    def __init__(self, base: nn.Embedding, max_loras: int, max_rank: int, dtype: torch.dtype, backend: Backend,
                 state: StepState) -> None:
        group = EmbeddingGroup(base.num_embeddings, max_loras, max_rank, base.weight.device, dtype,
                               base.weight.dtype, backend)
        super().__init__(base, base.num_embeddings, base.embedding_dim, group, 0, state)
        self.embedding_group = group
        self.replacements = Replacements()
        scale = getattr(base, "embed_scale", None)  # Gemma-style embeddings scale their output
        self.output_scale = None if scale is None else torch.as_tensor(scale, device=base.weight.device)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        meta = self.state.meta
        y = self.add_lora(self.base(ids), ids, meta)
        if meta is not None and meta.row_mask & self.replacements.mask:
            y = y.contiguous()
            self.replacements.embed_(y.view(-1, self.out_features), ids.reshape(-1), meta, self.output_scale)
        return y

    @torch.no_grad()
    def write_slot(self, row: int, a: torch.Tensor, b: torch.Tensor, scale: float,
                   magnitude: torch.Tensor | None = None) -> None:
        if magnitude is not None:
            raise ValueError("DoRA on the input embedding is not served")  # refused at parse already
        factor = 1.0 if self.output_scale is None else float(self.output_scale)
        super().write_slot(row, a, b, scale * factor)

    def users(self) -> int:
        return self._masks[0] | self.replacements.mask


def replacement(rows: torch.Tensor, indices: torch.Tensor | None, like: torch.Tensor) -> Replacement:
    """A replacement on `like`'s device and dtype (the base weight it stands in for)."""
    return Replacement(rows.to(like.device, like.dtype).contiguous(),
                       None if indices is None else indices.to(like.device))
