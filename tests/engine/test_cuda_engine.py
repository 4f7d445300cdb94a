"""The engine with the Triton LoRA kernels equals PEFT: one mixed batch (base + 4 adapters, ranks 8
and 16, all-linear / q-v / MLP-rsLoRA), greedy, on a tiny random Llama loaded through the engine's
real `--model <folder>` path (word-level tokenizer, see bench/gpu_engine.py).

- On a CUDA GPU (compiled kernels, the engine's own dispatch): skipped without CUDA (CI has none);
  run there with `python -m pytest -q tests/engine/test_cuda_engine.py`.
- On the CPU through Triton's interpreter (the engine's LoRA backend forced to the Triton kernels),
  so CI checks how the engine drives the kernels (step metadata, stacked slices, mixed slots).
"""

from __future__ import annotations

import pytest
import torch

NO_CUDA = "needs a CUDA GPU: torch.cuda.is_available() is False here"


def check_against_peft(tmp_path, device: str) -> None:
    from bench.gpu_engine import TINY, correctness

    report: dict = {}
    correctness(TINY, tmp_path, device, 12, report)
    assert report["adapters_change_output"] > 0, "the adapters must change the greedy output for the check to mean much"
    assert report["f32_identical"] == report["f32_total"], report["f32_first_mismatch"]
    assert report["bf16_max_logprob_diff"] < 0.1, report


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_mixed_batch_greedy_equals_peft_on_cuda(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    from server.lora.ops import backend_for

    assert backend_for(torch.device("cuda")).name == "triton", "CUDA must dispatch to the Triton kernels"
    check_against_peft(tmp_path, "cuda")


@pytest.mark.full
def test_mixed_batch_greedy_equals_peft_with_interpreted_triton_kernels(tmp_path, monkeypatch) -> None:
    pytest.importorskip("triton")
    from tests.lora.test_triton_ops import INTERPRETER_PROBLEM

    if INTERPRETER_PROBLEM:
        pytest.skip(INTERPRETER_PROBLEM)
    import server.engine.engine
    from server.lora.ops import triton_backend

    # The engine picks its backend (server/engine/engine.py); the CPU tensors then run in the interpreter.
    monkeypatch.setattr(server.engine.engine, "backend_for", lambda *args: triton_backend())
    check_against_peft(tmp_path, "cpu")
