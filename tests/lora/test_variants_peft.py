"""Every adapter kind beyond plain LoRA (DoRA, LoRA and DoRA on lm_head, LoRA on the input embedding,
modules_to_save copies, trainable tokens) in ONE mixed batch with plain adapters and base rows equals
PEFT's single-adapter forward and greedy decoding, row by row: on untied and tied-embedding bases,
through the compiled CPU kernels, the batched-matmul fallback and the Triton kernels (interpreted),
with float32 and bfloat16 slots. Each variant is also checked to differ clearly from plain LoRA and
from the base, so a variant silently served as plain LoRA fails."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from server.adapters.layout import BaseLayout
from server.adapters.peft_format import ParsedAdapter, load_peft_adapter
from server.lora.model import LoraModel
from server.lora.ops import CPU, CPU_KERNELS, Backend
from server.native.loader import load_kernels
from tests.lora.padded_batch import forward_logits, generate_batch
from tests.lora.test_peft_equivalence import assert_rows_match_oracle, mixed_rows
from tests.lora.variant_adapters import VARIANT_CONFIGS, SeparateOracles, make_variant_adapters
from safetensors.torch import load_file, save_file

MAX_RANK = 16
VOCAB = 256
STEPS = 6  # greedy tokens per row (PEFT's generate runs each row on its own: the test's main cost)


@pytest.fixture(scope="module", autouse=True)
def kernels() -> None:
    assert load_kernels(), "the CPU LoRA kernels must build here (a C++ compiler and ninja are installed)"


def tiny_base(tied: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=1, pad_token_id=0, bos_token_id=None, tie_word_embeddings=tied)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def variants(request, tmp_path_factory):
    base = tiny_base(request.param)
    paths = make_variant_adapters(base, tmp_path_factory.mktemp("variants"))
    return base, paths, SeparateOracles(base, paths)


def build(base, paths: dict, backend: Backend, weight_dtype=None, extra: dict | None = None):
    model = copy.deepcopy(base)
    layout = BaseLayout.from_model(model)
    parsed = {name: load_peft_adapter(path, layout, MAX_RANK) for name, path in paths.items()}
    parsed.update(extra or {})
    lora = LoraModel(model, layout, max_loras=len(parsed), max_rank=MAX_RANK, backend=backend,
                     weight_dtype=weight_dtype)
    for slot, adapter in enumerate(parsed.values()):
        lora.write_slot(slot, adapter)
    return lora, list(parsed), parsed


def plain_part(adapter: ParsedAdapter, layout: BaseLayout) -> ParsedAdapter:
    """The adapter as plain LoRA on linear layers only: no DoRA magnitude, no lm_head or embedding
    LoRA, no trained copies or token rows (what a server ignoring the variant would compute)."""
    modules = {name: dataclasses.replace(w, magnitude=None) for name, w in adapter.modules.items()
               if name in layout.linear}
    return dataclasses.replace(adapter, modules=modules, target_modules=tuple(modules), saved={}, tokens={})


@pytest.mark.parametrize("backend", [CPU_KERNELS, CPU], ids=lambda b: b.name)
def test_mixed_batch_of_every_kind_equals_peft(variants, backend):
    base, paths, oracle = variants
    lora, names, _ = build(base, paths, backend)
    rows, slots = mixed_rows(VOCAB, names)
    ours = forward_logits(lora, rows, slots, 0)
    greedy = generate_batch(lora, rows, slots, STEPS, [1], 0)
    checked = assert_rows_match_oracle(oracle, names, rows, slots, ours, greedy, STEPS, 0, [1])
    assert checked == {*names, None}


def test_each_kind_differs_from_plain_lora_and_from_the_base(variants):
    """The same rows through each variant, its plain-LoRA part alone (in other slots of the same batch)
    and the base: every variant moves the logits away from both."""
    base, paths, _ = variants
    layout = BaseLayout.from_model(base)
    parsed = {name: load_peft_adapter(path, layout, MAX_RANK) for name, path in paths.items()}
    plain = {f"{name}/plain": plain_part(adapter, layout) for name, adapter in parsed.items() if name != "plain"}
    lora, names, _ = build(base, paths, CPU_KERNELS, extra=plain)
    row = list(range(3, 12)) + [200, 5, 7]  # trainable token ids among them
    variant_names = [n for n in paths if n != "plain"]
    slots = [names.index(n) for n in variant_names] + [names.index(f"{n}/plain") for n in variant_names] + [-1]
    logits = forward_logits(lora, [row] * len(slots), slots, 0)
    count = len(variant_names)
    for i, name in enumerate(variant_names):
        versus_plain = (logits[i] - logits[count + i]).abs().max().item()
        versus_base = (logits[i] - logits[-1]).abs().max().item()
        assert versus_plain > 0.05 and versus_base > 0.05, f"{name}: {versus_plain=} {versus_base=}"


@pytest.mark.full
def test_row_moves_carry_dora_vectors_and_replaced_weights(variants):
    """Compacting used slots moves DoRA's vectors, the lm_head/embedding buffers and replaced weights
    with their adapters: after the move the batch still equals PEFT."""
    base, paths, oracle = variants
    lora, names, _ = build(base, paths, CPU)  # the padded slots move rows; the adapter pool never does
    n = len(names)
    lora.place([n - 3, n - 2, n - 1])
    assert lora.row_moves == 3
    rows, slots = mixed_rows(VOCAB, names)
    ours = forward_logits(lora, rows, slots, 0)
    greedy = generate_batch(lora, rows, slots, 4, [1], 0)
    assert assert_rows_match_oracle(oracle, names, rows, slots, ours, greedy, 4, 0, [1]) == {*names, None}


@pytest.mark.parametrize("backend", [CPU_KERNELS, pytest.param(CPU, marks=pytest.mark.full)], ids=lambda b: b.name)
def test_bfloat16_slots_hold_bfloat16_saved_variants_exactly(variants, tmp_path, backend):
    """`--lora-dtype bfloat16`: variants saved in bfloat16 (their scales are powers of two) give PEFT's
    float32 output; DoRA's vectors are computed in float32 from the adapter's own values."""
    base, paths, _ = variants
    bf16 = {name: bfloat16_copy(path, tmp_path / name) for name, path in paths.items()}
    lora, names, _ = build(base, bf16, backend, weight_dtype=torch.bfloat16)
    specials = [layer.lora for layer in lora.special.values() if layer.lora is not None]
    assert specials
    if lora.pool is not None:  # every LoRA weight, the output layer's and the embedding's too, in the pool
        assert lora.pool.data.dtype == torch.bfloat16
    else:
        assert all(layer.b_storage.dtype == torch.bfloat16 for layer in [*lora.layers.values(), *specials])
    rows, slots = mixed_rows(VOCAB, names)
    ours = forward_logits(lora, rows, slots, 0)
    greedy = generate_batch(lora, rows, slots, STEPS, [1], 0)
    assert assert_rows_match_oracle(SeparateOracles(base, bf16), names, rows, slots, ours, greedy, STEPS, 0,
                                    [1]) == {*names, None}


def bfloat16_copy(source, folder):
    """The adapter saved again in bfloat16, except PEFT's copies of the base weights (`base_layer`): those
    are the base's own values (PEFT loads them into the model, so rounding them would change its base)."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_bytes((source / "adapter_config.json").read_bytes())
    tensors = load_file(source / "adapter_model.safetensors")
    save_file({k: v if ".base_layer." in k else v.to(torch.bfloat16) for k, v in tensors.items()},
              folder / "adapter_model.safetensors")
    return folder


def test_plain_adapters_and_base_leave_the_special_layers_alone(variants):
    """A server whose adapters never touch lm_head or the embedding wraps neither (no buffers), and
    plain-LoRA rows skip DoRA's rescaling: their output is bit for bit the one without variants."""
    base, paths, _ = variants
    plain_only = {"plain": paths["plain"]}
    lora_plain, _, _ = build(base, plain_only, CPU_KERNELS)
    assert lora_plain.special == {} and all(layer.dora is None for layer in lora_plain.layers.values())
    lora_all, names, _ = build(base, {"plain": paths["plain"], **paths}, CPU_KERNELS)
    rows = [[3, 4, 5, 6], [7, 8, 9]]
    alone = forward_logits(lora_plain, rows, [0, -1], 0)
    mixed = forward_logits(lora_all, rows, [names.index("plain"), -1], 0)
    assert all(torch.equal(a, b) for a, b in zip(alone, mixed))


def test_lora_buffers_of_lm_head_only_for_lora_there(variants):
    """Adapters that only replace lm_head (a trained copy) wrap it without allocating its LoRA buffers."""
    base, paths, _ = variants
    lora, _, _ = build(base, {"saved-copies": paths["saved-copies"]}, CPU_KERNELS)
    head = lora.special["lm_head"]
    assert head.lora is None and 0 < head.nbytes()[2] < lora.saved_bytes  # the embedding's copy is the rest
    lora.clear_slot(0)
    assert lora.saved_bytes == 0


def test_variant_configs_cover_every_kind():
    kinds = {key for config in VARIANT_CONFIGS.values() for key in config if config.get(key) is not None}
    assert {"use_dora", "modules_to_save", "trainable_token_indices"} <= kinds
    targets = {t for c in VARIANT_CONFIGS.values() if isinstance(c["target_modules"], list) for t in c["target_modules"]}
    assert {"lm_head", "embed_tokens"} <= targets


@pytest.mark.full  # seconds per forward in the interpreter
def test_triton_kernels_serve_every_kind(variants):
    """The Triton kernels (run by Triton's interpreter on CPU tensors; compiled on a GPU) under the same
    mixed batch: one short row per adapter and a base row."""
    pytest.importorskip("triton")
    from server.lora.ops import triton_backend
    from tests.lora.test_triton_ops import INTERPRETER_PROBLEM

    if INTERPRETER_PROBLEM is not None:
        pytest.skip(INTERPRETER_PROBLEM)
    base, paths, oracle = variants
    if not base.config.tie_word_embeddings:
        pytest.skip("one base is enough for the interpreted kernels (seconds per forward): the tied one runs")
    lora, names, _ = build(base, paths, triton_backend())
    rows = [[5, 6, 7, 200, 9, 3][: 3 + i % 3] for i in range(len(names) + 1)]
    slots = list(range(len(names))) + [-1]
    ours = forward_logits(lora, rows, slots, 0)
    greedy = generate_batch(lora, rows, slots, 2, [1], 0)
    assert assert_rows_match_oracle(oracle, names, rows, slots, ours, greedy, 2, 0, [1]) == {*names, None}
