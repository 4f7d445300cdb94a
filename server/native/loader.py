"""Builds and loads the compiled CPU kernels: one library of torch ops in namespace `loraplex`.

    lora_kernels.cpp       loraplex::shrink_slots / expand_slots, shrink_pool / expand_pool (the LoRA op,
                           server/lora/cpu_native.py), loraplex::lora_pool_group (server/lora/cpu_group.py);
                           its register tiles in lora_tiles.h, its work split in lora_units.h
    attention_kernels.cpp  loraplex::paged_decode_attention        (decode attention, server/engine/decode_kernel.py),
                           loraplex::rope_cache_write              (rotary + cache write, server/engine/lean_forward.py)
    quant_kernels.cpp      loraplex::quant_linear / quant_dequantize (quantized base linears, server/quant/);
                           the block formats in quant_formats.h, the exact and int8 kernels in quant_exact.h
                           and quant_int8.h, the lane layouts' kernels in quant_lanes.h

They are compiled on first use with torch's extension loader (a C++ compiler and ninja are needed;
`-march=native`, so the build folder is keyed by this CPU's instruction-set flags) and cached in
torch's extensions folder (`TORCH_EXTENSIONS_DIR`): about 10 s once, then a 0.1 s load. A library
built ahead (the container image builds one for x86-64-v3 in a stage with a compiler) is loaded
instead when `LORAPLEX_CPU_KERNELS_LIBRARY` names it. `load_kernels` returns False when they can be
neither loaded nor built; callers then use torch ops (the batched-matmul LoRA backend, gather + bmm
decode attention).
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

log = logging.getLogger(__name__)
SOURCES = [Path(__file__).with_name(name) for name in ("lora_kernels.cpp", "attention_kernels.cpp", "quant_kernels.cpp")]
LIBRARY_NAME = "loraplex_cpu"
PREBUILT_ENV = "LORAPLEX_CPU_KERNELS_LIBRARY"
PREBUILT_NEEDS = {"avx2", "fma"}  # x86-64-v3's vector instructions, which the prebuilt library uses
NATIVE = ["-march=native"]
PORTABLE = ["-march=x86-64-v3", "-mtune=generic"]  # what the prebuilt library is built for


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


def build_library(folder: Path, arch_flags: list[str]) -> Path:
    """Compile the sources into `folder` (reused when up to date) and load the library; returns its path."""
    from torch.utils.cpp_extension import load

    _put_ninja_on_path()
    folder.mkdir(parents=True, exist_ok=True)
    load(name=LIBRARY_NAME, sources=[str(s) for s in SOURCES], build_directory=str(folder), is_python_module=False,
         extra_cflags=["-O3", *arch_flags, "-fopenmp"])
    return folder / f"{LIBRARY_NAME}.so"


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
        from torch.utils.cpp_extension import _get_build_directory

        build_library(Path(_get_build_directory(LIBRARY_NAME, verbose=False)) / _cpu_key(), NATIVE)
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a failed build: all mean "use the fallback"
        log.warning("the compiled CPU kernels are unavailable (%s: %s); the LoRA op and decode attention use "
                    "torch ops", type(exc).__name__, str(exc).strip().splitlines()[-1] if str(exc).strip() else "")
        return False
    return True
