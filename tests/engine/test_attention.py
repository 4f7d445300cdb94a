"""Paged KV cache + packed attention: logits equal plain transformers, step after step."""

from __future__ import annotations

import copy
import os
import random
import sys
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GptOssConfig, LlamaConfig,
                          MistralConfig, Qwen2Config, StableLmConfig)
from transformers.masking_utils import create_causal_mask

from server.engine.attention import PAGED_ATTENTION, SeqSlice, StepAttention, packed_forward, use_paged_attention
from server.engine.kv_cache import BlockAllocator, KVCache, OutOfBlocks, bytes_per_token
from server.native.loader import load_kernels

BLOCK = 4
def kernels() -> bool:
    assert load_kernels(), "the compiled CPU kernels must build here (a C++ compiler and ninja are installed)"
    return True


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)


# Each architecture with the attention variant it brings: windows of 4 and 6 tokens (the test's contexts
# reach 16), mixed sliding and full layers, softcapped scores, sink logits, a layer that drops kwargs.
VARIANTS = {
    "llama": (LlamaConfig, {}),
    "qwen2": (Qwen2Config, {}),
    "mistral-window": (MistralConfig, dict(sliding_window=4)),
    "gemma2-softcap-window": (Gemma2Config, dict(sliding_window=6, attn_logit_softcapping=2.0, head_dim=16,
                                                 query_pre_attn_scalar=16)),
    "gemma3-mixed-layers": (Gemma3TextConfig, dict(sliding_window=4, layer_types=["sliding_attention",
                                                                                   "full_attention"], head_dim=16)),
    "gpt-oss-sinks": (GptOssConfig, dict(sliding_window=4, num_local_experts=4, num_experts_per_tok=2,
                                         head_dim=16, layer_types=["sliding_attention", "full_attention"])),
    "stablelm-kwargs-dropped": (StableLmConfig, dict(num_key_value_heads=2)),
}


def _tiny_models(config_cls, extra: dict):
    torch.manual_seed(0)
    config = config_cls(**{**TINY, **extra}, initializer_range=0.2)
    ref = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # non-zero q/k/v biases (Qwen2) and sinks (gpt-oss), so a missing one would show
        for name, p in ref.named_parameters():
            if name.endswith("bias") or name.endswith("sinks"):
                p.normal_(0, 0.5)
    paged = use_paged_attention(copy.deepcopy(ref))
    assert ref.config._attn_implementation == "eager"
    return ref, paged


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def models(request):
    return _tiny_models(*VARIANTS[request.param])


def contiguous_tables(kv: KVCache, lengths: list[int]) -> list[list[int]]:
    return [kv.allocator.allocate(kv.blocks_for(n)) for n in lengths]


def interleaved_tables(kv: KVCache, lengths: list[int]) -> list[list[int]]:
    """Blocks handed out round-robin across sequences, then shuffled within each table."""
    tables: list[list[int]] = [[] for _ in lengths]
    while any(len(t) < kv.blocks_for(n) for t, n in zip(tables, lengths)):
        for t, n in zip(tables, lengths):
            if len(t) < kv.blocks_for(n):
                t.extend(kv.allocator.allocate(1))
    rng = random.Random(1)
    for t in tables:
        rng.shuffle(t)
    return tables


def _schedule(prompts: dict[str, list[int]], decode_steps: int):
    """Yield per step: list of (name, new_tokens_count). A whole, B in two chunks, C from step 2."""
    yield [("A", len(prompts["A"])), ("B", 6)]
    yield [("B", len(prompts["B"]) - 6), ("C", len(prompts["C"])), ("A", 1)]
    for _ in range(decode_steps):
        yield [("A", 1), ("B", 1), ("C", 1)]


def _run_and_compare(ref, paged, make_tables, decode_kernel: bool = False) -> None:
    gen = torch.Generator().manual_seed(3)
    prompts = {name: torch.randint(0, 128, (n,), generator=gen).tolist() for name, n in [("A", 7), ("B", 11), ("C", 5)]}
    total = {name: len(p) + 5 for name, p in prompts.items()}  # room for the decoded tokens
    kv = KVCache.from_config(paged.model.config, num_blocks=32, block_size=BLOCK)
    tables = dict(zip(total, make_tables(kv, list(total.values()))))
    tokens = {name: list(p) for name, p in prompts.items()}  # tokens known so far
    cached = {name: 0 for name in prompts}
    for step in _schedule(prompts, decode_steps=4):
        seqs = [(tokens[n][cached[n]:cached[n] + k], cached[n] + k, tables[n]) for n, k in step]
        logits = packed_forward(paged, kv, seqs, decode_kernel)
        assert logits.shape == (len(step), 128)
        for row, (name, k) in enumerate(step):
            cached[name] += k
            with torch.no_grad():
                expected = ref(input_ids=torch.tensor([tokens[name][:cached[name]]])).logits[0, -1]
            torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=0)
            if cached[name] == len(tokens[name]):  # prompt done: greedy-extend it
                tokens[name].append(int(expected.argmax()))


@pytest.mark.parametrize("decode_kernel", [False, True], ids=["torch", "kernel"])
def test_packed_steps_match_transformers(models, decode_kernel):
    _run_and_compare(*models, contiguous_tables, decode_kernel and kernels())


@pytest.mark.parametrize("decode_kernel", [False, True], ids=["torch", "kernel"])
def test_shuffled_non_contiguous_blocks_match(models, decode_kernel):
    _run_and_compare(*models, interleaved_tables, decode_kernel and kernels())


def test_step_plan_indices():
    seqs = [SeqSlice(0, 2, 6, [5, 2]), SeqSlice(2, 1, 3, [7]), SeqSlice(3, 3, 3, [1])]
    step = StepAttention.build(seqs, block_size=4, device="cpu")
    assert step.slot_mapping.tolist() == [8, 9, 30, 4, 5, 6]  # block * 4 + offset in block
    assert step.positions.tolist() == [4, 5, 2, 0, 1, 2] and step.last_rows.tolist() == [1, 2, 5]
    assert step.decode_rows.tolist() == [2] and step.decode_blocks.tolist() == [7]
    assert torch.isinf(step.decode_bias[0, 0, 0]).tolist() == [False] * 3 + [True]
    chunk, first = step.prefills  # a later chunk gathers its blocks; a first chunk needs nothing
    assert chunk.blocks.tolist() == [5, 2] and first.blocks is None and first.bias is None
    assert (chunk.bias == 0).sum(1).tolist() == [5, 6]  # query i sees keys 0 .. 4 + i
    with pytest.raises(ValueError):
        StepAttention.build([SeqSlice(0, 1, 5, [0])], block_size=4, device="cpu")


@pytest.mark.parametrize("decode_kernel", [False, True], ids=["torch", "kernel"])
def test_decode_only_plan_matches_the_general_plan(decode_kernel):
    """A step of decode rows only is planned from Python ints: the same tensors as the general path gives
    those rows when a prefill chunk shares the step (decode rows are packed first)."""
    rng = random.Random(0)
    for _ in range(50):
        block = rng.choice([1, 4, 16])
        decode = []
        for i in range(rng.randint(1, 6)):
            context = rng.randint(1, 60)
            blocks = -(-context // block) + rng.randint(0, 2)  # tables may hold blocks past the context
            decode.append(SeqSlice(i, 1, context, rng.sample(range(200), blocks)))
        prefill = SeqSlice(len(decode), 3, 3, [197, 198, 199])
        alone = StepAttention.build(decode, block, "cpu", decode_kernel=decode_kernel)
        mixed = StepAttention.build([*decode, prefill], block, "cpu", decode_kernel=decode_kernel)
        n = len(decode)
        for name in ("slot_mapping", "positions", "last_rows"):
            assert torch.equal(getattr(alone, name), getattr(mixed, name)[:n]), name
        for name in ("decode_rows", "decode_blocks", "decode_lens") + (() if decode_kernel else ("decode_bias",)):
            assert torch.equal(getattr(alone, name), getattr(mixed, name)), name
        assert alone.prefills == [] and (alone.decode_bias is None) == decode_kernel
        assert alone.max_context == max(s.context_len for s in decode)
        assert all(getattr(alone, f).dtype == torch.long for f in ("slot_mapping", "positions", "decode_blocks"))


def test_packed_forward_creates_no_transformers_cache(models, monkeypatch):
    _, paged = models

    def no_cache(*args, **kwargs):
        raise AssertionError("transformers built its own KV cache")

    monkeypatch.setattr(sys.modules[type(paged.model).__module__], "DynamicCache", no_cache)
    kv = KVCache.from_config(paged.model.config, num_blocks=4, block_size=BLOCK)
    assert packed_forward(paged, kv, [([1, 2, 3], 3, [0])]).shape == (1, 128)


def test_no_causal_mask_is_built(models):
    _, paged = models
    assert paged.model.config._attn_implementation == PAGED_ATTENTION
    embeds = torch.zeros(1, 9, 64)
    assert create_causal_mask(paged.model.config, embeds, None, None, torch.arange(9)[None]) is None


def test_attention_without_step_raises(models):
    _, paged = models
    with pytest.raises(RuntimeError, match="paged_step"), torch.no_grad():
        paged.model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False)


def test_kv_cache_shapes_and_budget():
    config = LlamaConfig(**TINY)
    kv = KVCache.from_token_budget(config, kv_cache_tokens=30, block_size=BLOCK)
    assert kv.num_blocks == 8 and kv.keys[0].shape == (2, 8, BLOCK, 16) and len(kv.values) == 2
    assert kv.bytes == 2 * 2 * 8 * BLOCK * 2 * 16 * 4
    assert kv.blocks_for(0) == 0 and kv.blocks_for(4) == 1 and kv.blocks_for(5) == 2


def test_kv_cache_from_memory_budget_fits_whole_blocks():
    config = LlamaConfig(**TINY)
    per_token = bytes_per_token(config, torch.float32)
    assert per_token == 2 * 2 * 2 * 16 * 4  # keys and values, 2 layers, 2 kv heads, head_dim 16, fp32
    kv = KVCache.from_memory_budget(config, 10 * BLOCK * per_token + 1, block_size=BLOCK)
    assert kv.num_blocks == 10 and kv.bytes == 10 * BLOCK * per_token
    with pytest.raises(ValueError, match="one block"):
        KVCache.from_memory_budget(config, BLOCK * per_token - 1, block_size=BLOCK)


def test_cpu_kv_cache_is_zero_and_commits_memory_only_as_it_fills():
    def resident_bytes() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = resident_bytes()
    kv = KVCache.from_memory_budget(LlamaConfig(**TINY), 512 * 2**20, block_size=BLOCK)
    assert kv.bytes > 500 * 2**20 and resident_bytes() - before < 64 * 2**20
    assert not any(pool.any() for pool in (kv.keys[0][:, :8], kv.values[1][:, -8:]))
    kv.keys[0][:, 3] = 1.0
    assert kv.keys[0][:, 3].eq(1).all() and not kv.keys[1][:, 3].any()  # layers do not share memory


def test_allocator_all_or_nothing_and_double_free():
    alloc = BlockAllocator(5)
    a = alloc.allocate(3)
    assert len(set(a)) == 3 and alloc.num_free == 2 and alloc.num_total == 5
    with pytest.raises(OutOfBlocks):
        alloc.allocate(3)
    assert alloc.num_free == 2  # nothing was taken by the failed call
    b = alloc.allocate(2)
    assert not set(a) & set(b) and alloc.num_free == 0
    alloc.free(a)
    assert alloc.num_free == 3 and sorted(alloc.allocate(3)) == sorted(a)
    alloc.free(b)
    with pytest.raises(ValueError):
        alloc.free(b)
    with pytest.raises(ValueError):
        alloc.free([99])
    assert alloc.num_free == 2
