"""The kernels on blocks written by llama.cpp's own quantizer (llama-quantize): the Q4_K_M GGUF of the
1B-class random-weight Llama that `make bench-cpu-peer` builds (Q4_K and Q6_K tensors), or the file named
by LORAPLEX_TEST_GGUF; skipped when neither exists. And the kernels built for other CPUs (portable, and
x86-64-v3 as the container image builds them) in subprocesses. All marked full (`make test-full`)."""

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


@pytest.mark.full  # reading the 1B file's index takes seconds to tens of seconds on a loaded machine
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


BUILD_CHECK = textwrap.dedent("""
    import sys, tempfile
    import torch
    from torch.utils.cpp_extension import load
    from server.native.loader import _put_ninja_on_path
    from tests.quant.blocks import TYPES, quantized
    from tests.quant.test_quant_linear import INT8_ROWS, int8_activations, int8_group, matmul_tolerance, offsets
    arch, int8_exact = sys.argv[1], sys.argv[2] == "exact"
    _put_ninja_on_path()
    load(name="loraplex_quant_" + arch.replace("-", "_"), sources=["server/native/quant_kernels.cpp"],
         is_python_module=False, build_directory=tempfile.mkdtemp(), extra_cflags=["-O2", "-march=" + arch, "-fopenmp"])
    for qtype in TYPES:
        k = 512 if qtype.value >= 10 else 96
        blocks, weight = quantized(qtype, 24, k)
        b = offsets(qtype, blocks)
        for m in (1, 5, 40):
            x = torch.randn(m, k)
            for int8 in (False, True):
                out = torch.empty(m, 24)
                torch.ops.loraplex.quant_linear(x, blocks, int(qtype), out, int8)
                if int8 and not int8_exact and m <= INT8_ROWS:  # the int8 path: quants meet the rounded activations
                    expected = int8_activations(x, int8_group(qtype)) @ (weight - b).T + x @ b.T
                else:
                    expected = x @ weight.T
                bound = matmul_tolerance(x, weight, b)
                assert bool(((out - expected).abs() <= bound).all()), (qtype.name, m, int8)
    print("build ok")
""")


@pytest.mark.full
@pytest.mark.parametrize(("arch", "int8"), [("x86-64", "exact"), ("x86-64-v3", "integer")],
                         ids=["portable", "x86-64-v3"])
def test_other_builds_compute_every_type(arch, int8):
    """The portable decoders (no AVX2: int8 computes exactly), and the container image's x86-64-v3 build (AVX2
    without AVX-512 VNNI: int8 dot products by maddubs and madd instead of dpbusd)."""
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", BUILD_CHECK, arch, int8], cwd=root, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0 and "build ok" in result.stdout, result.stderr[-3000:]
