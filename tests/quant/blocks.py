"""Quantized blocks for the tests, and gguf-py's dequantizers as the oracle of their layout. Blocks of the
32-weight types come from gguf-py's quantizer; it has none for the k-quants, whose blocks are random bytes
with sane float16 scales (every bit of the layout exercised)."""

from __future__ import annotations

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType
SMALL = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
K_QUANTS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
TYPES = SMALL + K_QUANTS
# Byte offsets of each k-quant block's float16 scales (d, dmin); the other bytes are quants and 6/8-bit scales.
HALF_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
# The largest |sub-block scale x quant| of each k-quant: d of 0.3 / SPAN gives weights within about +-0.3,
# a trained layer's range.
SPAN = {Q.Q2_K: 15 * 3, Q.Q3_K: 32 * 4, Q.Q4_K: 63 * 15, Q.Q5_K: 63 * 31, Q.Q6_K: 128 * 32}
WEIGHT_STD = 0.05
# Each block's quant bytes: zeroed, every weight dequantizes to its offset b (w = a * q + b).
QUANT_BYTES = {Q.Q4_0: (2, 18), Q.Q4_1: (4, 20), Q.Q5_0: (2, 22), Q.Q5_1: (4, 24), Q.Q8_0: (2, 34),
               Q.Q2_K: (16, 80), Q.Q3_K: (0, 96), Q.Q4_K: (16, 144), Q.Q5_K: (16, 176), Q.Q6_K: (0, 192)}


def quantized(qtype, rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks [rows, bytes per row], the weight gguf-py dequantizes them to)."""
    rng = np.random.default_rng(seed)
    if qtype in SMALL:
        blocks = gguf.quants.quantize(WEIGHT_STD * rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    else:
        weights, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, (rows, cols // weights, nbytes), dtype=np.uint8)
        for at in HALF_FIELDS[qtype]:
            scale = (rng.uniform(0.5, 1.0, blocks.shape[:2]) * 0.3 / SPAN[qtype]).astype(np.float16)
            blocks[..., at:at + 2] = scale[..., None].view(np.uint8)
        blocks = blocks.reshape(rows, -1)
    dequantized = gguf.quants.dequantize(blocks, qtype).reshape(rows, cols)
    return torch.from_numpy(blocks.view(np.uint8).reshape(rows, -1).copy()), torch.from_numpy(dequantized)
