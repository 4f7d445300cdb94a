"""One mixed batch (every adapter plus base rows) equals PEFT's single-adapter forward, row by row;
also with bfloat16 adapter slots beside the float32 model."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from peft import PeftModel

from server.adapters.layout import BaseLayout
from server.adapters.peft_format import load_peft_adapter
from tests.lora.padded_batch import forward_logits, generate_batch
from server.lora.model import LoraModel
from server.lora.ops import CPU, CPU_KERNELS, Backend
from tests.conftest import tiny_llama
from tests.lora.peft_fixtures import ADAPTER_CONFIGS, make_peft_adapters
from tests.peft_adapters import save_bfloat16_copy

MAX_RANK = 64


def build_lora(base: torch.nn.Module, paths: dict, weight_dtype: torch.dtype | None = None,
               backend: Backend | None = None) -> tuple[LoraModel, list[str]]:
    model = copy.deepcopy(base)
    layout = BaseLayout.from_model(model)
    lora = LoraModel(model, layout, max_loras=len(paths), max_rank=MAX_RANK, backend=backend, weight_dtype=weight_dtype)
    names = list(paths)
    for slot, name in enumerate(names):
        lora.write_slot(slot, load_peft_adapter(paths[name], layout, MAX_RANK))
    return lora, names


def mixed_rows(vocab: int, names: list[str]) -> tuple[list[list[int]], list[int]]:
    """A row per adapter, interleaved with base rows, of different lengths (so padding is exercised)."""
    gen = torch.Generator().manual_seed(7)
    rows, slots = [], []
    for i, _ in enumerate(names):
        for slot in ([i, -1] if i % 3 == 0 else [i]):
            length = 5 + (len(rows) * 3) % 11
            rows.append(torch.randint(3, vocab, (length,), generator=gen).tolist())
            slots.append(slot)
    return rows, slots


def peft_oracle(base, paths: dict) -> PeftModel:
    """One PeftModel holding every adapter; `set_adapter` picks the single active one."""
    names = list(paths)
    oracle = PeftModel.from_pretrained(copy.deepcopy(base), paths[names[0]], adapter_name=names[0]).eval()
    for name in names[1:]:
        oracle.load_adapter(paths[name], adapter_name=name)
    return oracle


def oracle_run(oracle: PeftModel, name: str | None, row: list[int], steps: int, pad_id: int, eos_ids: list[int]):
    """PEFT's single-adapter (or adapter-disabled) logits and greedy continuation for one row."""
    ids = torch.tensor([row])
    with torch.inference_mode(), (oracle.disable_adapter() if name is None else contextlib.nullcontext()):
        if name is not None:
            oracle.set_adapter(name)
        logits = oracle(input_ids=ids).logits[0]
        out = oracle.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                              do_sample=False, eos_token_id=eos_ids, pad_token_id=pad_id)
    tokens = out[0, len(row):].tolist()
    return logits, tokens[: next((i + 1 for i, t in enumerate(tokens) if t in eos_ids), len(tokens))]


def assert_rows_match_oracle(oracle: PeftModel, names: list[str], rows, slots, ours, ours_greedy, steps: int,
                             pad_id: int, eos_ids: list[int]) -> set[str | None]:
    """Each row's logits within 1e-3 of PEFT's single-adapter run and the same greedy continuation;
    returns the adapter names checked (None = base)."""
    checked: set[str | None] = set()
    for row, slot, logits, greedy in zip(rows, slots, ours, ours_greedy):
        name = names[slot] if slot >= 0 else None
        expected, ref_tokens = oracle_run(oracle, name, row, steps, pad_id, eos_ids)
        err = (logits - expected).abs().max().item()
        assert err < 1e-3, f"{name or 'base'}: max abs logit error {err}"
        assert greedy == ref_tokens, f"{name or 'base'}: greedy continuation differs"
        checked.add(name)
    return checked


def check_logits_and_greedy(base, paths, vocab, pad_id, eos_ids, steps=32):
    lora, names = build_lora(base, paths)
    rows, slots = mixed_rows(vocab, names)
    ours = forward_logits(lora, rows, slots, pad_id)
    # q/k/v and gate/up share one stacked shrink: one per group per forward (4 per Llama layer, not 7).
    assert [g.shrinks for g in lora.groups] == [1] * len(lora.groups)
    assert sum(g.members for g in lora.groups) == len(lora.layers) > len(lora.groups)
    ours_greedy = generate_batch(lora, rows, slots, steps, eos_ids, pad_id)
    assert_rows_match_oracle(peft_oracle(base, paths), names, rows, slots, ours, ours_greedy, steps, pad_id, eos_ids)
    # Adapters really change the output: every adapter row differs from the base on the same input.
    base_logits = forward_logits(lora, rows, [-1] * len(rows), pad_id)
    for logits, blog, slot in zip(ours, base_logits, slots):
        if slot >= 0:
            assert (logits - blog).abs().max().item() > 1e-2


def test_mixed_batch_equals_peft_on_tiny_llama(tmp_path):
    base = tiny_llama()
    paths = make_peft_adapters(base, tmp_path)
    assert len(paths) == len(ADAPTER_CONFIGS) >= 8
    check_logits_and_greedy(base, paths, vocab=256, pad_id=0, eos_ids=[1])


@pytest.mark.slow
@pytest.mark.full
def test_mixed_batch_equals_peft_on_default_model(tmp_path, default_base):
    base = default_base.model
    # Small B keeps the random adapters' logits in the model's normal range, where 1e-3 is meaningful.
    paths = make_peft_adapters(base, tmp_path, scale_b=0.05)
    tok = default_base.tokenizer
    check_logits_and_greedy(base, paths, vocab=tok.vocab_size, pad_id=tok.pad_token_id, eos_ids=[tok.eos_token_id])


def test_row_moves_carry_each_module_s_ranks(tmp_path):
    """Compacting the used slots into a dense prefix moves adapters between rows, and each module's
    rank table with them: a stale one would skip a moved adapter's modules or stop short of its rank
    (layer1-r12 lands in the row qv-r4 held). A batch over every adapter still equals PEFT."""
    base = tiny_llama()
    paths = make_peft_adapters(base, tmp_path)
    lora, names = build_lora(base, paths, backend=CPU)  # the padded slots move rows; the adapter pool never does
    n = len(names)
    lora.place([n - 3, n - 2, n - 1])
    assert lora.row_moves == 3 and {lora.row_of[s] for s in range(n - 3, n)} == {0, 1, 2}
    rows, slots = mixed_rows(256, names)
    ours = forward_logits(lora, rows, slots, pad_id=0)
    greedy = generate_batch(lora, rows, slots, 8, [1], 0)
    checked = assert_rows_match_oracle(peft_oracle(base, paths), names, rows, slots, ours, greedy, 8, 0, [1])
    assert checked == {*names, None}


# Adapters whose scale (alpha / r, or alpha / sqrt(r)) is a power of two: B * scale is exact in bfloat16.
POWER_OF_TWO_SCALES = ["qv-r4", "regex-r16", "mlp-r32", "all-r64", "patterns-r8", "layer1-r12"]


@pytest.mark.parametrize("backend", [CPU_KERNELS, CPU], ids=lambda b: b.name)
def test_bfloat16_slots_hold_bfloat16_saved_adapters_exactly(tmp_path, backend):
    """`--lora-dtype bfloat16` beside a float32 model: adapters saved in bfloat16 give PEFT's float32
    output (PEFT widens them on load; the slots keep them as they are and the op computes in float32),
    through the compiled kernels and through the batched-matmul fallback."""
    base = tiny_llama()
    saved = make_peft_adapters(base, tmp_path / "f32")
    paths = {name: save_bfloat16_copy(saved[name], tmp_path / "bf16" / name) for name in POWER_OF_TWO_SCALES}
    lora, names = build_lora(base, paths, torch.bfloat16, backend)
    if lora.pool is not None:
        assert lora.pool.data.dtype == torch.bfloat16
    else:
        assert all(g.a_storage.dtype == torch.bfloat16 for g in lora.groups)
        assert all(layer.b_storage.dtype == torch.bfloat16 for layer in lora.layers.values())
    rows, slots = mixed_rows(256, names)
    ours = forward_logits(lora, rows, slots, 0)
    ours_greedy = generate_batch(lora, rows, slots, 32, [1], 0)
    checked = assert_rows_match_oracle(peft_oracle(base, paths), names, rows, slots, ours, ours_greedy, 32, 0, [1])
    assert checked == {*names, None}


def test_bfloat16_slots_round_float32_adapters_by_a_bounded_amount(tmp_path):
    """float32-saved adapters in bfloat16 slots: each row's logits move from PEFT's by at most 2% of
    what the adapter itself changes (8 bits of mantissa per weight), and never on base rows."""
    base = tiny_llama()
    paths = make_peft_adapters(base, tmp_path)
    lora, names = build_lora(base, paths, torch.bfloat16)
    rows, slots = mixed_rows(256, names)
    ours = forward_logits(lora, rows, slots, 0)
    oracle = peft_oracle(base, paths)
    for row, slot, logits in zip(rows, slots, ours):
        name = names[slot] if slot >= 0 else None
        expected, _ = oracle_run(oracle, name, row, 1, 0, [1])
        err = (logits - expected).abs().max().item()
        if name is None:
            assert err < 1e-3
            continue
        base_logits, _ = oracle_run(oracle, None, row, 1, 0, [1])
        effect = (expected - base_logits).abs().max().item()
        assert 0 < err < 0.02 * effect, f"{name}: error {err} against an adapter effect of {effect}"
