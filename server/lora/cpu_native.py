"""The compiled CPU backend of the LoRA op: rank-aware kernels over each slot's rows (float32).

Same contract as the reference in server/lora/ops.py (`shrink` returns a dense `t [N, R]`, 0 on
rows of the base model), computed from `meta.slot_plan`:

    decode rows in CSR per slot  -> loraplex::shrink_slots / expand_slots (server/lora/cpu_kernels.cpp):
                                    each slot's A and B streamed once, only up to its adapter's rank
    prefill chunks, long runs    -> one matmul per segment (a GEMM is faster there)

Why a kernel of our own: with one or two rows per adapter the LoRA op reads every adapter's
weights once per step and does almost no arithmetic, so it is bound by memory traffic; torch's
batched matmul over the padded slots reached about half the machine's read bandwidth on these
shapes and read the rank padding too (a batch of rank 8-64 adapters all at rank 64).

The kernels are compiled on first use with torch's extension loader (a C++ compiler and ninja are
needed; `-march=native`, so the build folder is keyed by this CPU's instruction-set flags) and
cached in torch's extensions folder (`TORCH_EXTENSIONS_DIR`). A library built ahead (the container
image builds one for x86-64-v3 in a stage with a compiler) is loaded instead when
`LORAPLEX_CPU_KERNELS_LIBRARY` names it. `load_kernels` returns False when they can be neither
loaded nor built; the caller then uses the batched-matmul backend (server/lora/cpu_ops.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
from functools import lru_cache
from pathlib import Path

import torch

from server.lora.step import LoraStepMeta

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
PREBUILT_ENV = "LORAPLEX_CPU_KERNELS_LIBRARY"


PREBUILT_NEEDS = {"avx2", "fma"}  # x86-64-v3's vector instructions, which the prebuilt library uses


def _cpu_flags() -> str:
    """This CPU's instruction-set flags as /proc/cpuinfo lists them ("" where there is none)."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def _cpu_key() -> str:
    """A short key of this CPU's instruction set (a `-march=native` build runs on exactly this)."""
    return hashlib.sha256(f"{platform.machine()} {_cpu_flags() or platform.processor()}".encode()).hexdigest()[:12]


def _put_ninja_on_path() -> None:
    """torch's loader runs `ninja` from PATH; the pip package's binary is not on it in an unactivated venv."""
    if shutil.which("ninja") is None:
        import ninja

        os.environ["PATH"] = os.pathsep.join(p for p in (ninja.BIN_DIR, os.environ.get("PATH")) if p)


@lru_cache(maxsize=1)
def load_kernels() -> bool:
    """Build (first time) and load the kernels into this process; False, with the reason logged, if impossible."""
    try:
        prebuilt = os.environ.get(PREBUILT_ENV)
        if prebuilt:
            missing = PREBUILT_NEEDS - set(_cpu_flags().split())
            if missing:  # loading it would end the process with an illegal instruction
                raise RuntimeError(f"{prebuilt} needs CPU features this CPU lacks: {sorted(missing)}")
            torch.ops.load_library(prebuilt)
            return True
        from torch.utils.cpp_extension import _get_build_directory, load

        _put_ninja_on_path()
        build = Path(_get_build_directory("loraplex_cpu_lora", verbose=False)) / _cpu_key()
        build.mkdir(parents=True, exist_ok=True)
        load(name="loraplex_cpu_lora", sources=[str(SOURCE)], build_directory=str(build), is_python_module=False,
             extra_cflags=["-O3", "-march=native", "-fopenmp"])
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a failed build: all mean "use the fallback"
        log.warning("the compiled CPU LoRA kernels are unavailable (%s: %s); using batched matmuls",
                    type(exc).__name__, str(exc).strip().splitlines()[-1] if str(exc).strip() else "")
        return False
    return True


def _ranks(meta: LoraStepMeta, width: int) -> torch.Tensor:
    """The slots' ranks when the buffers are `width` wide per member (meta.max_rank), else `width`
    for every slot: the padding is then read, and the result is the same."""
    if meta.max_rank == width:
        return meta.slot_ranks
    return torch.full((meta.slot_ranks.numel(),), width, dtype=torch.int32, device=meta.slot_ranks.device)


def shrink(x: torch.Tensor, a: torch.Tensor, meta: LoraStepMeta) -> torch.Tensor:
    """t [N, R'] = a[slot] @ x per row (0 on base rows); `x [N, in]`, `a [S, R', in]` contiguous in `in`."""
    t = x.new_zeros(x.shape[0], a.shape[1])
    plan = meta.slot_plan
    if plan.ptr is not None:
        a = a if a.stride(2) == 1 else a.contiguous()  # the layers' buffers already are; a copy otherwise
        stacked = meta.max_rank and a.shape[1] % meta.max_rank == 0  # members of max_rank columns each
        members = a.shape[1] // meta.max_rank if stacked else 1
        torch.ops.loraplex.shrink_slots(x, a, plan.ptr, plan.rows, _ranks(meta, a.shape[1] // members), members, t)
    for start, length, slot in plan.segments:
        torch.mm(x[start:start + length], a[slot].t(), out=t[start:start + length])
    return t


def expand_(y: torch.Tensor, t: torch.Tensor, b: torch.Tensor, meta: LoraStepMeta, out_offset: int = 0) -> None:
    """y[:, out_offset:out_offset+out] += b[slot] @ t per row; `b [S, out, R]` with `out` contiguous."""
    out = y[:, out_offset:out_offset + b.shape[1]]
    plan = meta.slot_plan
    if plan.ptr is not None:
        b = b if b.stride(1) == 1 else b.transpose(1, 2).contiguous().transpose(1, 2)  # as the layers keep it
        torch.ops.loraplex.expand_slots(out, t, b, plan.ptr, plan.rows, _ranks(meta, b.shape[2]))
    for start, length, slot in plan.segments:
        out[start:start + length].addmm_(t[start:start + length], b[slot].t())
