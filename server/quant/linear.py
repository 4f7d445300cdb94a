"""`QuantLinear`: a linear layer whose weight stays in quantized blocks.

    layer = QuantLinear(blocks, qtype, in_features, out_features, bias)
    y = layer(x)          # x [..., in_features] float32 -> [..., out_features]

`blocks [out_features, in_features / block_weights * block_bytes]` uint8 are GGUF's blocks of each weight
row, as the file stores them (row i of the weight is row i of the blocks). `int8=True` computes with
activations quantized to int8 per block (32 weights, 256 for the k-quants; integer dot
products; a bounded deviation from the exact result, see `quant_linear` in server/native/quant_kernels.cpp).
The LoRA layers wrap it as they wrap `nn.Linear` (`in_features`, `out_features`, and `weight`, which dequantizes on demand: DoRA's
norms read it once per adapter written to a slot).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

# ggml type id -> (weights per block, bytes per block), for the types the kernels compute in their blocks
BLOCKS = {2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
          10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210)}
TYPE_NAMES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
              10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}
# The int8 mode's lane layouts (`quant_int8_layout`, VNNI builds): id -> (the ggml type whose quants they hold,
# reordered; bytes per 256-weight block)
LANES = {112: (12, 148), 114: (14, 210)}


def type_name(qtype: int) -> str:
    return TYPE_NAMES[LANES[qtype][0]] if qtype in LANES else TYPE_NAMES[qtype]


@lru_cache(maxsize=1)
def _quant_linear():
    """The kernel's op overload (resolved once; the library is loaded by then)."""
    return torch.ops.loraplex.quant_linear_forward.default


def row_bytes(qtype: int, features: int) -> int | None:
    """Bytes of one row of `features` weights in `qtype`'s blocks; None if they do not fill whole blocks."""
    weights, nbytes = (256, LANES[qtype][1]) if qtype in LANES else BLOCKS[qtype]
    return None if features % weights else features // weights * nbytes


class QuantLinear(nn.Module):
    """`y = x @ W^T + bias` with `W` dequantized block by block as the kernel reads it (float32 sums)."""

    def __init__(self, blocks: torch.Tensor, qtype: int, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None, int8: bool = False) -> None:
        super().__init__()
        if qtype not in BLOCKS:
            raise ValueError(f"unsupported quantized type {qtype}")
        if row_bytes(qtype, in_features) is None or tuple(blocks.shape) != (out_features, row_bytes(qtype, in_features)):
            raise ValueError(f"blocks {tuple(blocks.shape)} do not hold a [{out_features}, {in_features}] "
                             f"{TYPE_NAMES[qtype]} weight")
        if int8:  # the layout the int8 kernels read fastest on this CPU (where there is one: a reordered copy)
            blocks, qtype = torch.ops.loraplex.quant_int8_layout(blocks.contiguous(), qtype, in_features)
        self.in_features, self.out_features, self.qtype, self.int8 = in_features, out_features, qtype, int8
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
        # Called some 200 times per decode step: parameters from the dict (not Module.__getattr__), the op's
        # resolved overload; the kernel itself takes 10-100 us at batch 1.
        params = self._parameters
        out = _quant_linear()(x, params["blocks"], self.qtype, self.int8)
        bias = params.get("bias")  # None is kept as a plain attribute, a tensor as a parameter
        if bias is not None:
            out += bias
        return out

    def extra_repr(self) -> str:
        mode = ", int8 activations" if self.int8 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {type_name(self.qtype)}{mode}"


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

    def share(self, head: QuantLinear) -> None:
        """Read the rows from a tied head's blocks (which may be a reordered copy of this table's) and drop
        this table's own, so that the model holds the table once."""
        self.blocks, self.qtype = head.blocks, head.qtype

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {type_name(self.qtype)}"
