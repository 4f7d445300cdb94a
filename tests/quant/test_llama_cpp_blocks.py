"""The kernels on blocks written by llama.cpp's own quantizer (llama-quantize): the Q4_K_M GGUF of the
1B-class random-weight Llama that `make bench-cpu-peer` builds (Q4_K and Q6_K tensors), or the file named
by LORAPLEX_TEST_GGUF; skipped when neither exists. And the portable decoder path (no AVX2), built in a
subprocess, against the same oracle (marked full: a separate build)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from server.native.loader import load_kernels
from server.quant.linear import QuantLinear
from tests.quant.test_quant_linear import assert_matmul_close, matmul_tolerance

GGUF = Path(os.environ.get("LORAPLEX_TEST_GGUF",
                           Path.home() / ".cache" / "loraplex" / "cpu-peer" / "1b" / "llama-1b-Q4_K_M.gguf"))
TENSORS = ["blk.0.attn_q.weight", "blk.0.ffn_down.weight", "token_embd.weight", "blk.3.ffn_up.weight"]
ROWS = 96  # a slice of each tensor's rows keeps the test quick


@pytest.fixture(scope="module")
def tensors() -> dict[str, tuple[int, torch.Tensor, torch.Tensor]]:
    """name -> (type, blocks [ROWS, bytes], gguf-py's dequantized weight [ROWS, in_features])."""
    if not GGUF.is_file():
        pytest.skip(f"{GGUF} is absent (make bench-cpu-peer builds it)")
    assert load_kernels()
    found = {t.name: t for t in gguf.GGUFReader(str(GGUF)).tensors}
    out = {}
    for name in TENSORS:
        tensor = found[name]
        qtype = tensor.tensor_type
        blocks = np.array(tensor.data[:ROWS], copy=True).view(np.uint8).reshape(ROWS, -1)
        weight = gguf.quants.dequantize(blocks, qtype).reshape(ROWS, -1)
        out[name] = (int(qtype), torch.from_numpy(blocks), torch.from_numpy(weight))
    return out


@pytest.mark.parametrize("name", TENSORS)
def test_llama_cpp_blocks(tensors, name):
    qtype, blocks, weight = tensors[name]
    assert gguf.GGMLQuantizationType(qtype).name in ("Q4_K", "Q6_K")
    k = weight.shape[1]
    scale = float(weight.abs().max())
    for reference in (False, True):
        dequantized = torch.ops.loraplex.quant_dequantize(blocks, qtype, k, reference)
        torch.testing.assert_close(dequantized, weight, atol=1e-6 * scale, rtol=1e-6)
    layer = QuantLinear(blocks, qtype, k, ROWS)
    for m in (1, 5, 40):
        x = torch.randn(m, k)
        assert_matmul_close(layer(x), x @ weight.T, matmul_tolerance(x, weight))


PORTABLE_CHECK = textwrap.dedent("""
    import sys, tempfile
    import gguf, numpy as np, torch
    from torch.utils.cpp_extension import load
    from server.native.loader import _put_ninja_on_path
    from tests.quant.blocks import TYPES, quantized
    _put_ninja_on_path()
    load(name="loraplex_quant_portable", sources=["server/native/quant_kernels.cpp"], is_python_module=False,
         build_directory=tempfile.mkdtemp(), extra_cflags=["-O2", "-march=x86-64", "-fopenmp"])
    for qtype in TYPES:
        k = 512 if qtype.value >= 10 else 96
        blocks, weight = quantized(qtype, 24, k)
        for m in (1, 5, 40):
            x = torch.randn(m, k)
            for int8 in (False, True):  # int8 needs AVX2: the portable build computes exactly either way
                out = torch.empty(m, 24)
                torch.ops.loraplex.quant_linear(x, blocks, int(qtype), out, int8)
                bound = 1e-5 * (x.abs() @ weight.abs().T) + 1e-6
                assert bool(((out - x @ weight.T).abs() <= bound).all()), (qtype.name, m, int8)
    print("portable ok")
""")


@pytest.mark.full
def test_portable_build_computes_every_type():
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", PORTABLE_CHECK], cwd=root, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0 and "portable ok" in result.stdout, result.stderr[-3000:]
