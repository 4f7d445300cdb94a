"""The quantized linear kernels against the dequantized weight, for every block type and row count the
engine makes (decode rows one by one and in fours, prefill tiles), with gguf-py's own quantizer making
the blocks."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from server.native.loader import load_kernels
from server.quant.linear import QuantEmbedding, QuantLinear

TYPES = [gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0]


@pytest.fixture(scope="module", autouse=True)
def built():
    assert load_kernels(), "the compiled CPU kernels must build here (a C++ compiler and ninja are installed)"


def quantized(qtype, rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, the weight gguf-py dequantizes them to)."""
    weight = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    blocks = gguf.quants.quantize(weight, qtype)
    dequantized = gguf.quants.dequantize(blocks, qtype).reshape(rows, cols)
    return torch.from_numpy(blocks.view(np.uint8).reshape(rows, -1).copy()), torch.from_numpy(dequantized)


@pytest.mark.parametrize("qtype", TYPES, ids=[t.name for t in TYPES])
@pytest.mark.parametrize("m", [1, 3, 4, 7, 8, 9, 17, 64, 65, 300])
def test_linear_equals_the_dequantized_weight(qtype, m):
    blocks, weight = quantized(qtype, 72, 96)
    bias = torch.randn(72)
    layer = QuantLinear(blocks, int(qtype), 96, 72, bias)
    torch.testing.assert_close(layer.weight, weight, atol=0, rtol=1e-6)  # the kernel's dequantization is gguf's
    x = torch.randn(2, m, 96)
    torch.testing.assert_close(layer(x), x @ weight.T + bias, atol=2e-5, rtol=1e-5)
    strided = torch.randn(m, 192)[:, ::2]  # a non-contiguous input
    torch.testing.assert_close(layer(strided), strided @ weight.T + bias, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("qtype", TYPES, ids=[t.name for t in TYPES])
def test_embedding_rows(qtype):
    blocks, table = quantized(qtype, 50, 64, seed=1)
    embedding = QuantEmbedding(blocks, int(qtype), 64)
    ids = torch.tensor([[3, 0, 49], [7, 7, 12]])
    torch.testing.assert_close(embedding(ids), table[ids], atol=0, rtol=1e-6)


def test_bad_blocks_are_refused():
    blocks, _ = quantized(gguf.GGMLQuantizationType.Q4_1, 8, 64)
    with pytest.raises(ValueError, match="do not hold"):
        QuantLinear(blocks, int(gguf.GGMLQuantizationType.Q4_1), 96, 8)
    with pytest.raises(ValueError, match="unsupported"):
        QuantLinear(blocks, int(gguf.GGMLQuantizationType.Q6_K), 64, 8)
    with pytest.raises(RuntimeError, match="blocks per row"):
        torch.ops.loraplex.quant_linear(torch.randn(1, 32), blocks, int(gguf.GGMLQuantizationType.Q4_1),
                                        torch.empty(1, 8))
