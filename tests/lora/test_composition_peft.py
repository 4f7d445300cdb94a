"""A weighted composition of adapters equals PEFT's `add_weighted_adapter(..., combination_type="cat")`,
row by row, in one mixed batch with plain adapter rows and base rows."""

from __future__ import annotations

import copy

import pytest
import torch

from server.adapters.composition import compose
from server.adapters.layout import BaseLayout
from server.adapters.peft_format import load_peft_adapter
from server.lora.model import LoraModel
from tests.conftest import tiny_llama
from tests.lora.padded_batch import forward_logits, generate_batch
from tests.lora.test_peft_equivalence import MAX_RANK, assert_rows_match_oracle, mixed_rows, peft_oracle
from tests.peft_adapters import ADAPTER_CONFIGS, save_adapter

# Different ranks (4..32, one with a rank_pattern), alphas, rsLoRA, target sets and a negative weight.
# PEFT copies the first part's config for the new adapter (rsLoRA flag, layers_to_transform), so the
# first part of each is a plain adapter on every layer: then PEFT's result is the exact weighted sum.
COMPOSITIONS: dict[str, list[tuple[str, float]]] = {
    "qv+mlp": [("qv-r4", 0.7), ("mlp-r32", 0.3)],
    "three": [("patterns-r8", -0.5), ("all-r8-rslora", 1.2), ("qv-r4", 0.4)],
}
PLAIN = ["qv-r4", "mlp-r32"]


def save_parts(base: torch.nn.Module, folder, scale_b: float = 1.0) -> dict:
    names = sorted({n for parts in COMPOSITIONS.values() for n, _ in parts} | set(PLAIN))
    return {n: save_adapter(base, folder / n, seed=200 + i, scale_b=scale_b, **ADAPTER_CONFIGS[n])
            for i, n in enumerate(names)}


def check_compositions(base, paths, vocab, pad_id, eos_ids, steps=24):
    model = copy.deepcopy(base)
    layout = BaseLayout.from_model(model)
    parsed = {n: load_peft_adapter(p, layout, MAX_RANK) for n, p in paths.items()}
    entries = {n: parsed[n] for n in PLAIN}
    entries |= {c: compose([parsed[n] for n, _ in parts], [w for _, w in parts]) for c, parts in COMPOSITIONS.items()}
    # Disjoint targets stack nothing (rank 32, the larger part); q_proj stacks all three parts (16 + 8 + 4).
    assert entries["qv+mlp"].rank == 32 and entries["three"].rank == 16 + 8 + 4
    lora = LoraModel(model, layout, max_loras=len(entries), max_rank=MAX_RANK)
    names = list(entries)
    for slot, name in enumerate(names):
        lora.write_slot(slot, entries[name])
    rows, slots = mixed_rows(vocab, names)
    ours = forward_logits(lora, rows, slots, pad_id)
    ours_greedy = generate_batch(lora, rows, slots, steps, eos_ids, pad_id)

    oracle = peft_oracle(base, paths)
    for name, parts in COMPOSITIONS.items():
        oracle.add_weighted_adapter([n for n, _ in parts], [w for _, w in parts], name, combination_type="cat")
    checked = assert_rows_match_oracle(oracle, names, rows, slots, ours, ours_greedy, steps, pad_id, eos_ids)
    assert checked == set(names) | {None}
    # A composition is neither its parts nor the base: its rows differ from each part's on the same input.
    for name, parts in COMPOSITIONS.items():
        slot = names.index(name)
        i = slots.index(slot)
        for other in [n for n, _ in parts if n in names] + [None]:
            other_slot = names.index(other) if other else -1
            (theirs,) = forward_logits(lora, [rows[i]], [other_slot], pad_id)
            assert (ours[i] - theirs).abs().max().item() > 1e-2


def test_compositions_equal_peft_cat_on_tiny_llama(tmp_path):
    base = tiny_llama()
    check_compositions(base, save_parts(base, tmp_path), vocab=256, pad_id=0, eos_ids=[1])


@pytest.mark.slow
@pytest.mark.full
def test_compositions_equal_peft_cat_on_default_model(tmp_path, default_base):
    base = default_base.model
    tok = default_base.tokenizer
    check_compositions(base, save_parts(base, tmp_path, scale_b=0.05), vocab=tok.vocab_size,
                       pad_id=tok.pad_token_id, eos_ids=[tok.eos_token_id])
