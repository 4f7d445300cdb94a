"""`QuantLinear`: a linear layer whose weight stays in quantized blocks.

    layer = QuantLinear(blocks, qtype, in_features, out_features, bias)
    y = layer(x)          # x [..., in_features] float32 -> [..., out_features]

`blocks [out_features, in_features / 32 * block_bytes]` uint8 are GGUF's blocks of each weight row, as
the file stores them (row i of the weight is row i of the blocks). The LoRA layers wrap it as they
wrap `nn.Linear` (`in_features`, `out_features`, and `weight`, which dequantizes on demand: DoRA's
norms read it once per adapter written to a slot).
"""

from __future__ import annotations

import torch
from torch import nn

QK = 32  # weights per block
BLOCK_BYTES = {2: 2 + QK // 2, 3: 4 + QK // 2, 8: 2 + QK}  # ggml type id -> bytes per block
TYPE_NAMES = {2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}


class QuantLinear(nn.Module):
    """`y = x @ W^T + bias` with `W` dequantized block by block as the kernel reads it (float32 sums)."""

    def __init__(self, blocks: torch.Tensor, qtype: int, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if qtype not in BLOCK_BYTES:
            raise ValueError(f"unsupported quantized type {qtype}")
        if tuple(blocks.shape) != (out_features, in_features // QK * BLOCK_BYTES[qtype]) or in_features % QK:
            raise ValueError(f"blocks {tuple(blocks.shape)} do not hold a [{out_features}, {in_features}] "
                             f"{TYPE_NAMES[qtype]} weight")
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        # A parameter (never trained) so that the module's device is where its bytes are.
        self.blocks = nn.Parameter(blocks.contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight `[out_features, in_features]` (a new tensor each time)."""
        return torch.ops.loraplex.quant_dequantize(self.blocks, self.qtype, self.in_features)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel() + (0 if self.bias is None else self.bias.numel() * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.dtype != torch.float32 or rows.stride(-1) != 1:
            rows = rows.float().contiguous()
        out = torch.empty(rows.shape[0], self.out_features, dtype=torch.float32, device=x.device)
        torch.ops.loraplex.quant_linear(rows, self.blocks, self.qtype, out)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {TYPE_NAMES[self.qtype]}"


class QuantEmbedding(nn.Module):
    """An embedding table kept in quantized blocks: each looked-up row is dequantized as it is read.

    `blocks [num_embeddings, embedding_dim / 32 * block_bytes]`; `forward(ids [...])` -> `[..., embedding_dim]`
    float32. A tied output head is a `QuantLinear` over the same blocks.
    """

    def __init__(self, blocks: torch.Tensor, qtype: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.qtype = int(blocks.shape[0]), embedding_dim, qtype
        self.blocks = nn.Parameter(blocks.contiguous(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table `[num_embeddings, embedding_dim]` (a new tensor each time)."""
        return torch.ops.loraplex.quant_dequantize(self.blocks, self.qtype, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.blocks.index_select(0, ids.reshape(-1))
        return torch.ops.loraplex.quant_dequantize(rows, self.qtype, self.embedding_dim).view(
            *ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {TYPE_NAMES[self.qtype]}"
