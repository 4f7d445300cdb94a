"""The Triton LoRA kernels (server/lora/triton_ops.py) against a float64 per-token loop and against PEFT.

Every test runs on CPU tensors through Triton's interpreter (so CI checks the kernels with no GPU)
and again on CUDA tensors, compiled, when a GPU is present. Shapes stay small: the interpreter
runs each program in Python.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")

from server.adapters.layout import BaseLayout  # noqa: E402
from server.adapters.peft_format import load_peft_adapter  # noqa: E402
from server.lora import triton_ops  # noqa: E402
from server.lora.step import LoraStepMeta  # noqa: E402
from server.lora.triton_plan import plan_segments  # noqa: E402
from tests.conftest import tiny_llama  # noqa: E402

NO_GPU = "no CUDA GPU here: the compiled kernels are checked on a GPU; the interpreter runs them on this machine"


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative error bound of the delta (||got - want|| / ||want||) per dtype of weights and activations.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def make_meta(slots: list[int], ranks: list[int], device: str) -> LoraStepMeta:
    """The engine's own step context for per-token `slots` (-1 = base) and per-slot `ranks`."""
    return LoraStepMeta.build(slots, ranks, device, planner=plan_segments)


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels here, or None. Triton 3.6's interpreter
    cannot run a loop whose bounds are tensors (it converts 1-element arrays with int()); 3.9 can."""
    meta = make_meta([0], [1], "cpu")
    try:
        triton_ops.expand_(torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1, 1), meta, 0)
    except Exception as exc:  # noqa: BLE001 - any failure of the probe is the reason to skip
        import numpy
        import triton

        return (f"Triton {triton.__version__}'s interpreter (NumPy {numpy.__version__}) cannot run these kernels: "
                f"{exc}")[:300]
    return None


INTERPRETER_PROBLEM = interpreter_problem()
CPU = pytest.param("cpu", marks=pytest.mark.skipif(INTERPRETER_PROBLEM is not None, reason=str(INTERPRETER_PROBLEM)))
DEVICES = [CPU, pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU))]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def stacked_adapters(ranks: list[int], widths: list[int], rank: int, fan_in: int, dtype, seed: int):
    """A [S, len(widths) * rank, in] (one slice per projection) and B [S, out_j, rank] per projection,
    random inside each slot's rank, zero past it. Returns (a, bs, a_nan, bs_nan): the *_nan copies
    hold NaN in the padding, so a kernel that reads padding it was told to skip fails."""
    gen = torch.Generator().manual_seed(seed)
    slices = len(widths)
    a = torch.zeros(len(ranks), slices * rank, fan_in)
    bs = [torch.zeros(len(ranks), out, rank) for out in widths]
    for s, r in enumerate(ranks):
        for j, out in enumerate(widths):
            a[s, j * rank: j * rank + r] = torch.randn(r, fan_in, generator=gen) / fan_in ** 0.5
            bs[j][s, :, :r] = torch.randn(out, r, generator=gen) / max(r, 1) ** 0.5
    a, bs = a.to(dtype), [b.to(dtype) for b in bs]
    keep = torch.zeros(len(ranks), slices * rank, 1, dtype=torch.bool)
    for s, r in enumerate(ranks):
        for j in range(slices):
            keep[s, j * rank: j * rank + r] = True
    a_nan = torch.where(keep, a, torch.full_like(a, float("nan")))
    bs_nan = []
    for b in bs:
        cols = torch.arange(rank)[None, None, :] < torch.tensor(ranks)[:, None, None]
        bs_nan.append(torch.where(cols, b, torch.full_like(b, float("nan"))))
    return a, bs, a_nan, bs_nan


def reference_delta(x, a, bs, slots, rank):
    """float64 per-token loop: [N, sum(out_j)] LoRA delta, zero rows for base tokens."""
    n = x.shape[0]
    outs = [b.shape[1] for b in bs]
    delta = torch.zeros(n, sum(outs), dtype=torch.float64)
    for i, s in enumerate(slots):
        if s < 0:
            continue
        t = a[s].double() @ x[i].double()
        col = 0
        for j, b in enumerate(bs):
            delta[i, col: col + outs[j]] = b[s].double() @ t[j * rank: (j + 1) * rank]
            col += outs[j]
    return delta


def run_op(x, a, bs, meta, rank, y, offsets, path, slice_rank, fused=False):
    """The runner's use of the op: one shrink over stacked A, then one expand per slice into y.
    `fused`: the same through `lora_` (shrink partials straight into one multi-slice expand)
    plus, for the returned t, `expand_slices_` checked against the per-slice result."""
    t = triton_ops.shrink(x, a, meta, slice_rank=slice_rank, path=path)
    if fused:
        y_slices = y.clone()
        triton_ops.expand_slices_(y_slices, t, bs, meta, offsets, path=path)
        triton_ops.lora_(y, x, a, bs, meta, offsets, slice_rank=slice_rank, path=path)
        torch.testing.assert_close(y, y_slices)  # same sums, another order: rounding apart
        return t
    for j, (b, off) in enumerate(zip(bs, offsets)):
        triton_ops.expand_(y, t[:, j * rank: (j + 1) * rank], b, meta, off, path=path)
    return t


DECODE = [3, 0, -1, 2, 0, 5, 1, -1, 4]  # unsorted, base rows, slot 5 empty (rank 0)
PREFILL = [0] * 70 + [-1] * 3 + [2] * 17 + [1] * 5 + [5] * 4 + [3] * 2  # a segment over one row block
SLOT_RANKS = [20, 7, 13, 1, 20, 0]  # R = 20: neither a power of two nor a multiple of 8


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["bgmv", "sgmv"])
@pytest.mark.parametrize("slots", [DECODE, PREFILL], ids=["decode", "prefill"])
@pytest.mark.parametrize("fused", [False, True], ids=["per-slice", "fused"])
def test_stacked_strided_op_matches_reference(device, dtype, path, slots, fused):
    """Stacked q/k/v: strided x, t sliced per projection, y a column window of a wider buffer."""
    if device == "cpu" and path == "bgmv" and slots is PREFILL and (dtype != torch.float32 or fused):
        pytest.skip("slow in the interpreter (a program per row); float32 per-slice covers it on CPU")
    rank, fan_in, widths = 20, 40, [24, 8, 8]
    n = len(slots)
    a, bs, a_nan, bs_nan = stacked_adapters(SLOT_RANKS, widths, rank, fan_in, dtype, seed=n)
    torch.manual_seed(1)
    x_wide = torch.randn(n, 2 * fan_in).to(dtype)
    x = x_wide[:, ::2]  # column stride 2
    y_wide = torch.randn(n, 50).to(dtype)
    before = y_wide.clone()
    meta = make_meta(slots, SLOT_RANKS, device)
    y_dev = y_wide.to(device)
    t = run_op(x_wide.to(device)[:, ::2], a_nan.to(device), [b.to(device) for b in bs_nan], meta, rank,
               y_dev[:, 3:45], [0, 24, 32], path, slice_rank=rank, fused=fused)
    got = y_dev.cpu()
    want = reference_delta(x, a, bs, slots, rank)
    assert t.dtype == torch.float32 and t.shape == (n, 3 * rank)
    base_rows = [i for i, s in enumerate(slots) if s < 0 or SLOT_RANKS[s] == 0]
    assert torch.equal(t.cpu()[[i for i, s in enumerate(slots) if s < 0]], torch.zeros(slots.count(-1), 3 * rank))
    # Only the window's columns of LoRA rows change; everything else is bit-identical.
    assert torch.equal(got[:, :3], before[:, :3]) and torch.equal(got[:, 43:], before[:, 43:])
    assert torch.equal(got[base_rows], before[base_rows])
    assert not got.isnan().any()
    err = rel_err(got[:, 3:43].double() - before[:, 3:43].double(), want)
    assert err < TOL[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["bgmv", "sgmv"])
def test_rank_256_without_slice_rank(device, path):
    """The largest rank, odd ranks below it, and a shrink told nothing about slices (reads all R)."""
    rank, fan_in, out = 256, 24, 20
    ranks = [256, 130, 3]
    slots = [1, 1, 1, 1, 0, -1, 2, 2, 2, 2, 0]
    a, (b,), _, (b_nan,) = stacked_adapters(ranks, [out], rank, fan_in, torch.float32, seed=5)
    x = torch.randn(len(slots), fan_in)
    y = torch.zeros(len(slots), out)
    meta = make_meta(slots, ranks, device)
    y_dev = y.to(device)
    run_op(x.to(device), a.to(device), [b_nan.to(device)], meta, rank, y_dev, [0], path, slice_rank=None)
    assert rel_err(y_dev.cpu(), reference_delta(x, a, [b], slots, rank)) < TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_all_base_step_is_a_no_op(device):
    meta = make_meta([-1, -1, -1], [8, 8], device)
    a, (b,), _, _ = stacked_adapters([8, 8], [6], 8, 10, torch.float32, seed=0)
    x, y = torch.randn(3, 10, device=device), torch.randn(3, 6, device=device)
    before = y.clone()
    t = triton_ops.shrink(x, a.to(device), meta)
    triton_ops.expand_(y, t, b.to(device), meta, 0)
    assert torch.equal(t, torch.zeros(3, 8, device=device)) and torch.equal(y, before)


def test_interpreter_runs_where_ci_runs():
    """CI has no GPU: the interpreter must work there, or the kernels go unchecked."""
    if INTERPRETER_PROBLEM is not None and torch.cuda.is_available():
        pytest.skip(INTERPRETER_PROBLEM)
    assert INTERPRETER_PROBLEM is None


def test_rejects_what_it_cannot_compute():
    meta = make_meta([0], [4], "cpu")
    x = torch.randn(1, 8)
    with pytest.raises(ValueError, match="rank 300 exceeds 256"):
        triton_ops.shrink(x, torch.zeros(1, 300, 8), meta)
    with pytest.raises(ValueError, match="features"):
        triton_ops.shrink(x, torch.zeros(1, 4, 9), meta)
    with pytest.raises(ValueError, match="dtype"):
        triton_ops.shrink(x.double(), torch.zeros(1, 4, 8, dtype=torch.float64), meta)
    with pytest.raises(ValueError, match="outside y"):
        triton_ops.expand_(torch.zeros(1, 6), torch.zeros(1, 4), torch.zeros(1, 6, 4), meta, 1)


# --- PEFT as the oracle -------------------------------------------------------------------------

PEFT_ADAPTERS = {
    "qv-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora-r6": dict(r=6, lora_alpha=3, use_rslora=True,
                      target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]),
    "all-r12": dict(r=12, lora_alpha=24, target_modules="all-linear"),
    "patterns-r16": dict(r=16, lora_alpha=16, target_modules="all-linear",
                         rank_pattern={"k_proj": 5, "down_proj": 3}, alpha_pattern={"v_proj": 4}),
}
PEFT_MAX_RANK = 20
# The runner's projection groups: one shrink per group (A stacked), one expand per projection.
GROUPS = [("self_attn", ["q_proj", "k_proj", "v_proj"]), ("self_attn", ["o_proj"]),
          ("mlp", ["gate_proj", "up_proj"]), ("mlp", ["down_proj"])]
PEFT_SLOTS = [0, 0, 0, 0, 0, -1, 1, 2, 2, 2, 2, 2, 3, -1, 3, 1, 2]


@pytest.fixture(scope="module")
def peft_setup(tmp_path_factory):
    """A tiny Llama, PEFT's model holding every adapter, and the adapters as the server parses them."""
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tiny_llama()
    folder = tmp_path_factory.mktemp("peft")
    names = list(PEFT_ADAPTERS)
    for seed, name in enumerate(names):
        torch.manual_seed(100 + seed)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **PEFT_ADAPTERS[name]))
        model.save_pretrained(folder / name)
    oracle = PeftModel.from_pretrained(copy.deepcopy(base), folder / names[0], adapter_name=names[0]).eval()
    for name in names[1:]:
        oracle.load_adapter(folder / name, adapter_name=name)
    layout = BaseLayout.from_model(base)
    parsed = [load_peft_adapter(folder / name, layout, PEFT_MAX_RANK) for name in names]
    return oracle, names, parsed, layout.linear


def slot_buffers(parsed, modules: list[str], dims: dict, dtype):
    """A stacked [S, len(modules) * R, in] and B [S, out, R] per module, scale folded into B,
    as the server writes its slots (zeros where an adapter does not target a module)."""
    rank = PEFT_MAX_RANK
    fan_in = dims[modules[0]][0]
    a = torch.zeros(len(parsed), len(modules) * rank, fan_in)
    bs = [torch.zeros(len(parsed), dims[m][1], rank) for m in modules]
    for s, adapter in enumerate(parsed):
        for j, module in enumerate(modules):
            w = adapter.modules.get(module)
            if w is not None:
                r = w.a.shape[0]
                a[s, j * rank: j * rank + r] = w.a
                bs[j][s, :, :r] = w.b * w.scale
    return a.to(dtype), [b.to(dtype) for b in bs]


@pytest.mark.parametrize("device,dtype", [
    pytest.param("cpu", torch.float32, marks=CPU.marks),
    pytest.param("cuda", torch.float32, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)),
])
@pytest.mark.parametrize("path", ["bgmv", "sgmv"])
# The fused (stacked q/k/v, gate/up) variants also run in test_stacked_strided_op_matches_reference.
@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.full)], ids=["per-slice", "fused"])
def test_every_projection_matches_peft(peft_setup, device, dtype, path, fused):
    """Per layer and projection, base + our delta on a mixed batch equals PEFT's forward of each row
    with that row's adapter active (ranks 4, 5, 6, 3, 12, 16; rsLoRA, rank and alpha patterns)."""
    if device == "cuda":  # the oracle's cuBLAS matmuls in true float32, not tf32
        torch.backends.cuda.matmul.allow_tf32 = False
    oracle, names, parsed, layout_dims = peft_setup
    oracle = copy.deepcopy(oracle).to(device=device, dtype=dtype)  # the fixture's stays float32 on CPU
    ranks = [adapter.rank for adapter in parsed]
    meta = make_meta(PEFT_SLOTS, ranks, device)
    n = len(PEFT_SLOTS)
    gen = torch.Generator().manual_seed(3)
    for layer in range(len(oracle.get_base_model().model.layers)):
        for block, projections in GROUPS:
            modules = [f"model.layers.{layer}.{block}.{p}" for p in projections]
            peft_layers = [oracle.get_base_model().get_submodule(m) for m in modules]
            a, bs = slot_buffers(parsed, modules, layout_dims, dtype)
            x = torch.randn(n, a.shape[2], generator=gen).to(device=device, dtype=dtype)
            with torch.inference_mode():
                y = torch.cat([layer_.base_layer(x) for layer_ in peft_layers], dim=1)
                base_y = y.clone()
                offsets = torch.tensor([0] + [b.shape[1] for b in bs]).cumsum(0).tolist()
                run_op(x, a.to(device), [b.to(device) for b in bs], meta, PEFT_MAX_RANK, y, offsets[:-1], path,
                       slice_rank=PEFT_MAX_RANK, fused=fused)
                want = torch.cat([peft_deltas(oracle, names, peft_layer, x) for peft_layer in peft_layers], dim=1)
            where = f"layer {layer} {'/'.join(projections)}"
            base_rows = [i for i, s in enumerate(PEFT_SLOTS) if s < 0]
            assert torch.equal(y[base_rows], base_y[base_rows]), f"{where}: base rows changed"
            err = rel_err(y - base_y, want)
            assert err < TOL[dtype] * 5, f"{where}: relative error of the delta {err:.2e}"
            assert want.abs().max() > 0, f"{where}: no adapter changes these projections"


def peft_deltas(oracle, names: list[str], peft_layer, x: torch.Tensor) -> torch.Tensor:
    """PEFT's LoRA delta of each row: its forward with the row's adapter active minus its base layer
    on the same row (zero for base rows)."""
    rows = []
    for i, s in enumerate(PEFT_SLOTS):
        row = x[i: i + 1]
        if s < 0:
            rows.append(torch.zeros_like(peft_layer.base_layer(row)))
        else:
            oracle.set_adapter(names[s])
            rows.append(peft_layer(row) - peft_layer.base_layer(row))
    return torch.cat(rows)
