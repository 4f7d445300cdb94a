"""The quantized linear kernels against the dequantized weight, for every block type and row count the
engine makes (decode rows in groups of 8, 4, 2, 1, prefill tiles), gguf-py's dequantizers being the
oracle of each type's layout (tests/quant/blocks.py makes the blocks)."""

from __future__ import annotations

import gguf
import pytest
import torch

from server.native.loader import load_kernels
from server.quant.linear import QuantEmbedding, QuantLinear, row_bytes
from tests.quant.blocks import K_QUANTS, QUANT_BYTES, SMALL, TYPES, Q, quantized


@pytest.fixture(scope="module", autouse=True)
def built():
    assert load_kernels(), "the compiled CPU kernels must build here (a C++ compiler and ninja are installed)"


INT8_ROWS = 256  # rows per int8 slice (longer calls: several slices)


def width(qtype) -> int:
    return 512 if qtype in K_QUANTS else 96  # two super-blocks, three blocks


def offsets(qtype, blocks: torch.Tensor) -> torch.Tensor:
    """b of every weight: the blocks dequantized with their quants zeroed."""
    _, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    zeroed = blocks.numpy().reshape(blocks.shape[0], -1, nbytes).copy()
    zeroed[..., slice(*QUANT_BYTES[qtype])] = 0
    return torch.from_numpy(gguf.quants.dequantize(zeroed.reshape(blocks.shape[0], -1), qtype)).reshape(
        blocks.shape[0], -1)


def matmul_tolerance(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    """float32 summation-order slack of x @ W^T: a few units of rounding of the sum of |x| |W|."""
    return 1e-5 * (x.abs() @ sum(w.abs() for w in weights).T) + 1e-6


def assert_matmul_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: torch.Tensor) -> None:
    error = (actual - expected).abs()
    assert bool((error <= tolerance).all()), f"worst error {float((error / tolerance).max()):.3g} x the tolerance"


@pytest.mark.parametrize("qtype", TYPES, ids=[t.name for t in TYPES])
@pytest.mark.parametrize("reference", [False, True], ids=["vector", "portable"])
def test_dequantize_equals_gguf(qtype, reference):
    blocks, weight = quantized(qtype, 40, width(qtype))
    ours = torch.ops.loraplex.quant_dequantize(blocks, int(qtype), width(qtype), reference)
    # one fused multiply-add against gguf-py's multiply then add: equal to the rounding of one product
    torch.testing.assert_close(ours, weight, atol=1e-6 * float(weight.abs().max()), rtol=1e-6)


@pytest.mark.parametrize("qtype", TYPES, ids=[t.name for t in TYPES])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 8, 9, 17, 32, 33, 64, 65, 300])
def test_linear_equals_the_dequantized_weight(qtype, m):
    k = width(qtype)
    blocks, weight = quantized(qtype, 72, k)
    bias = torch.randn(72)
    layer = QuantLinear(blocks, int(qtype), k, 72, bias)
    x = torch.randn(2, m, k)
    assert_matmul_close(layer(x), x @ weight.T + bias, matmul_tolerance(x, weight))
    strided = torch.randn(m, 2 * k)[:, ::2]  # a non-contiguous input
    assert_matmul_close(layer(strided), strided @ weight.T + bias, matmul_tolerance(strided, weight))


def int8_group(qtype) -> int:
    """Activations per int8 scale: a block of the 32-weight types, a super-block of the k-quants."""
    return 256 if qtype in K_QUANTS else 32


def int8_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """x as the int8 mode reads it: each `group` rounded to the nearest multiple of max |x| / 127."""
    chunks = x.reshape(x.shape[0], -1, group)
    amax = chunks.abs().amax(-1, keepdim=True)
    # 127 / amax correctly rounded, as the kernel divides (`127 / tensor` is reciprocal-then-multiply in torch,
    # an ulp off at times, which moves exact rounding ties)
    q = torch.round(chunks * torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0))
    return (q * (amax / 127)).reshape(x.shape)


@pytest.mark.parametrize("qtype", TYPES, ids=[t.name for t in TYPES])
@pytest.mark.parametrize("m", [1, 3, 8, 13, 32, 70, INT8_ROWS, 2 * INT8_ROWS + 3])
@pytest.mark.parametrize("wide", [False, True], ids=["narrow", "wide"])
def test_int8_mode_rounds_only_the_activations_that_meet_the_quants(qtype, m, wide):
    """out = (a q) . x_int8 + b . x: the quants meet the rounded activations, the offsets the exact ones; so
    the deviation from exact is at most half a rounding step per activation times |a q|. Wide rows: the
    32-weight types' eight-block groups and a ragged tail (11 blocks), the k-quants' three super-blocks."""
    assert_int8_bound(qtype, m, (352 if qtype in SMALL else 768) if wide else width(qtype), 72)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=["Q4_K", "Q6_K"])
@pytest.mark.parametrize("m", [8, 16, 70])
def test_int8_mode_on_rows_longer_than_l1(qtype, m):
    """Rows of 17 super-blocks (8 activation rows of them outgrow L1: from 16 rows the lane layouts take two
    weight rows per pass) over an odd count of weight rows (the last one alone)."""
    assert_int8_bound(qtype, m, 17 * 256, 73)


def assert_int8_bound(qtype, m: int, k: int, n: int) -> None:
    blocks, weight = quantized(qtype, n, k, seed=2)
    b = offsets(qtype, blocks)
    layer = QuantLinear(blocks, int(qtype), k, n, int8=True)
    x = torch.randn(m, k)
    x[0, :int8_group(qtype)] = 0  # an all-zero group (no scale to divide by)
    out = layer(x)
    rounded = int8_activations(x, int8_group(qtype))
    assert_matmul_close(out, rounded @ (weight - b).T + x @ b.T, matmul_tolerance(x, weight, b))
    group = int8_group(qtype)
    steps = x.reshape(m, -1, group).abs().amax(-1, keepdim=True).expand(-1, -1, group).reshape(m, k) / 127
    bound = (steps / 2) @ (weight - b).abs().T + matmul_tolerance(x, weight, b)
    assert bool(((out - x @ weight.T).abs() <= bound).all())


@pytest.mark.parametrize("qtype", TYPES, ids=[t.name for t in TYPES])
def test_int8_layout_holds_the_same_weights(qtype):
    """Q4_K and Q6_K in the lane layout (VNNI builds): the same weights through both decoders; other types (and
    builds without the kernel) keep their blocks as they are."""
    k = width(qtype)
    blocks, _ = quantized(qtype, 24, k, seed=4)
    held, held_type = torch.ops.loraplex.quant_int8_layout(blocks, int(qtype), k)
    expected = torch.ops.loraplex.quant_dequantize(blocks, int(qtype), k, True)
    if held_type == int(qtype):
        assert held is blocks
        return
    assert qtype in (Q.Q4_K, Q.Q6_K) and held_type == int(qtype) + 100
    assert held.shape == (24, row_bytes(held_type, k)) and held.numel() <= 1.03 * blocks.numel()
    for reference in (False, True):
        assert torch.equal(torch.ops.loraplex.quant_dequantize(held, held_type, k, reference), expected)
    for m in (1, 13, 70):  # the exact mode on the lane layout (the start-up check runs every linear exact)
        x = torch.randn(m, k)
        out = torch.empty(m, 24)
        torch.ops.loraplex.quant_linear(x, held, held_type, out, False)
        assert_matmul_close(out, x @ expected.T, matmul_tolerance(x, expected))


@pytest.mark.parametrize("qtype", TYPES, ids=[t.name for t in TYPES])
def test_embedding_rows(qtype):
    blocks, table = quantized(qtype, 50, width(qtype), seed=1)
    embedding = QuantEmbedding(blocks, int(qtype), width(qtype))
    ids = torch.tensor([[3, 0, 49], [7, 7, 12]])
    torch.testing.assert_close(embedding(ids), table[ids], atol=1e-6 * float(table.abs().max()), rtol=1e-6)


def test_bad_blocks_are_refused():
    blocks, _ = quantized(Q.Q4_1, 8, 64)
    with pytest.raises(ValueError, match="do not hold"):
        QuantLinear(blocks, int(Q.Q4_1), 96, 8)
    with pytest.raises(ValueError, match="unsupported"):
        QuantLinear(blocks, int(Q.IQ4_NL), 64, 8)
    k_blocks, _ = quantized(Q.Q4_K, 8, 512)
    with pytest.raises(ValueError, match="do not hold"):  # 288 weights: not whole super-blocks
        QuantLinear(k_blocks[:, :144], int(Q.Q4_K), 288, 8)
    with pytest.raises(RuntimeError, match="blocks per row"):
        torch.ops.loraplex.quant_linear(torch.randn(1, 32), blocks, int(Q.Q4_1), torch.empty(1, 8))
    with pytest.raises(RuntimeError, match="multiple of 256"):
        torch.ops.loraplex.quant_linear(torch.randn(1, 288), k_blocks[:, :144].contiguous(), int(Q.Q4_K), torch.empty(1, 8))
    with pytest.raises(RuntimeError, match="unsupported"):
        torch.ops.loraplex.quant_dequantize(blocks, int(Q.IQ4_NL), 64)
