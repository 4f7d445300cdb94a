"""The compiled paged decode-attention kernel against plain softmax attention over each sequence's
own keys and values, on paged layouts of every shape the engine makes (GQA groups, head sizes with
and without a fast path, block sizes, context lengths from 1 token to many blocks)."""

from __future__ import annotations

import random

import pytest
import torch

from server.engine.attention import AttentionOptions, SeqSlice, StepAttention, _decode_attention, decode_kernel_applies
from server.engine.decode_kernel import decode_attention_kernel
from server.engine.kv_cache import KVCache
from server.native.loader import load_kernels


@pytest.fixture(scope="module", autouse=True)
def built():
    assert load_kernels(), "the compiled CPU kernels must build here (a C++ compiler and ninja are installed)"


def paged_case(heads: int, kv_heads: int, dim: int, block: int, lengths: list[int], seed: int = 0):
    """A cache whose blocks are handed to the sequences in shuffled order, random keys/values and queries."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    kv = KVCache(1, kv_heads, dim, num_blocks=sum(-(-n // block) for n in lengths) + 3, block_size=block)
    kv.keys[0].copy_(torch.randn(kv.keys[0].shape, generator=gen))
    kv.values[0].copy_(torch.randn(kv.values[0].shape, generator=gen))
    free = list(range(kv.num_blocks))
    rng.shuffle(free)
    seqs = []
    for i, n in enumerate(lengths):
        seqs.append(SeqSlice(i, 1, n, [free.pop() for _ in range(-(-n // block))]))
    query = torch.randn(1, heads, len(lengths), dim, generator=gen)
    return kv, seqs, query


def softmax_attention(kv: KVCache, seqs: list[SeqSlice], query: torch.Tensor, scale: float,
                      options: AttentionOptions = AttentionOptions()) -> torch.Tensor:
    """Each sequence alone: its keys/values slot by slot (the last `window` only), repeated per query head,
    scores softcapped, a sink logit per head in the denominator; `[n, H, D]`, in float64."""
    heads, group = query.shape[1], query.shape[1] // kv.num_kv_heads
    out = []
    for i, s in enumerate(seqs):
        first = max(0, s.context_len - options.window) if options.window else 0
        slots = torch.tensor([s.block_table[p // kv.block_size] * kv.block_size + p % kv.block_size
                              for p in range(first, s.context_len)])
        k = kv.flat_keys(0)[:, slots].repeat_interleave(group, 0).double()  # [H, L, D]
        v = kv.flat_values(0)[:, slots].repeat_interleave(group, 0).double()
        q = query[0, :, i].double()  # [H, D]
        scores = torch.einsum("hd,hld->hl", q, k) * scale
        if options.softcap:
            scores = options.softcap * torch.tanh(scores / options.softcap)
        if options.sinks is not None:
            scores = torch.cat([scores, options.sinks.double()[:, None]], dim=1)
        probs = torch.softmax(scores, -1)[:, :k.shape[1]]
        out.append(torch.einsum("hl,hld->hd", probs, v).float())
    assert all(o.shape == (heads, query.shape[3]) for o in out)
    return torch.stack(out)


def kernel(kv: KVCache, seqs: list[SeqSlice], query: torch.Tensor, scale: float | None = None,
           options: AttentionOptions = AttentionOptions()) -> torch.Tensor:
    step = StepAttention.build(seqs, kv.block_size, "cpu", decode_kernel=True)
    return decode_attention_kernel(query, kv, 0, step, scale or query.shape[3] ** -0.5, options)


CASES = [  # heads, kv_heads, head_dim, block size, context lengths
    (9, 3, 64, 16, [1, 15, 16, 17, 200, 511]),     # the default model's shapes
    (8, 8, 128, 16, [3, 64, 130]),                # no GQA, head_dim 128
    (8, 2, 24, 5, [1, 4, 5, 6, 33]),              # a head_dim without a fast path, odd block size
    (4, 1, 64, 1, [1, 2, 9]),                     # one token per block
]


@pytest.mark.parametrize("heads,kv_heads,dim,block,lengths", CASES)
def test_kernel_matches_softmax_attention(heads, kv_heads, dim, block, lengths):
    kv, seqs, query = paged_case(heads, kv_heads, dim, block, lengths)
    got = kernel(kv, seqs, query)
    torch.testing.assert_close(got, softmax_attention(kv, seqs, query, dim ** -0.5), atol=2e-6, rtol=1e-5)
    step = StepAttention.build(seqs, kv.block_size, "cpu")  # the torch path agrees too
    torch.testing.assert_close(got, _decode_attention(query, kv, 0, step, dim ** -0.5, AttentionOptions()),
                               atol=2e-6, rtol=1e-5)


VARIANTS = {  # the attention variants of Mistral / Gemma 2 / gpt-oss layers, alone and together
    "window": dict(window=7),
    "window-of-one": dict(window=1),
    "window-past-every-context": dict(window=4096),
    "softcap": dict(softcap=2.0),
    "sinks": dict(sinks=True),
    "all": dict(window=17, softcap=5.0, sinks=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("heads,kv_heads,dim,block,lengths", CASES[:3])
def test_variants_match_softmax_attention(variant, heads, kv_heads, dim, block, lengths):
    kv, seqs, query = paged_case(heads, kv_heads, dim, block, lengths)
    query *= 3  # large scores, so a softcap changes them
    chosen = dict(VARIANTS[variant])
    if chosen.pop("sinks", False):
        chosen["sinks"] = torch.randn(heads, generator=torch.Generator().manual_seed(5)) * 2
    options = AttentionOptions(**chosen)
    expected = softmax_attention(kv, seqs, query, dim ** -0.5, options)
    assert not torch.allclose(expected, softmax_attention(kv, seqs, query, dim ** -0.5), atol=1e-3) or \
        variant == "window-past-every-context"  # the variant changes the answer, so the check can fail
    torch.testing.assert_close(kernel(kv, seqs, query, None, options), expected, atol=2e-6, rtol=1e-5)
    step = StepAttention.build(seqs, kv.block_size, "cpu")
    torch.testing.assert_close(_decode_attention(query, kv, 0, step, dim ** -0.5, options), expected,
                               atol=5e-6, rtol=1e-5)


def test_scaling_and_large_scores():
    kv, seqs, query = paged_case(4, 2, 64, 16, [40, 7])
    query *= 30  # scores in the thousands: the max is subtracted before exp, so nothing overflows
    got = kernel(kv, seqs, query, scale=0.3)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, softmax_attention(kv, seqs, query, 0.3), atol=1e-5, rtol=1e-4)


def test_reads_nothing_past_each_sequence():
    # Every slot no sequence owns (the rest of each last block, the spare blocks) holds NaN.
    kv, seqs, query = paged_case(9, 3, 64, 16, [5, 33, 16])
    expected = softmax_attention(kv, seqs, query, 64 ** -0.5)
    owned = torch.zeros(kv.num_slots, dtype=torch.bool)
    for s in seqs:
        for p in range(s.context_len):
            owned[s.block_table[p // kv.block_size] * kv.block_size + p % kv.block_size] = True
    kv.flat_keys(0)[:, ~owned] = float("nan")
    kv.flat_values(0)[:, ~owned] = float("nan")
    torch.testing.assert_close(kernel(kv, seqs, query), expected, atol=2e-6, rtol=1e-5)


def test_bad_plans_raise_instead_of_reading_out_of_bounds():
    kv, seqs, query = paged_case(4, 2, 64, 16, [20])
    q = query[0].transpose(0, 1)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    op = torch.ops.loraplex.paged_decode_attention
    with pytest.raises(RuntimeError, match="block id"):
        op(q, kv.keys[0], kv.values[0], torch.tensor([[0, kv.num_blocks]]), torch.tensor([20]), 0.125, 0, 0.0, None, out)
    with pytest.raises(RuntimeError, match="context length"):
        op(q, kv.keys[0], kv.values[0], torch.tensor([[0, 1]]), torch.tensor([33]), 0.125, 0, 0.0, None, out)
    with pytest.raises(RuntimeError, match="float32"):
        op(q.double(), kv.keys[0], kv.values[0], torch.tensor([[0, 1]]), torch.tensor([20]), 0.125, 0, 0.0, None,
           out)
    with pytest.raises(RuntimeError, match="sinks"):
        op(q, kv.keys[0], kv.values[0], torch.tensor([[0, 1]]), torch.tensor([20]), 0.125, 0, 0.0, torch.zeros(3),
           out)


def test_choice_of_decode_attention(monkeypatch):
    from server.engine import decode_kernel

    cpu = torch.device("cpu")
    assert decode_kernel_applies(cpu, torch.float32, "auto") and decode_kernel_applies(cpu, torch.float32, "compiled")
    assert not decode_kernel_applies(cpu, torch.float32, "torch")
    assert not decode_kernel_applies(cpu, torch.bfloat16, "auto")  # float32 only
    assert not decode_kernel_applies(torch.device("cuda"), torch.float32, "auto")
    monkeypatch.setattr(decode_kernel, "load_kernels", lambda: False)  # no compiler here
    assert not decode_kernel_applies(cpu, torch.float32, "auto")
    with pytest.raises(RuntimeError, match="could not be built"):
        decode_kernel_applies(cpu, torch.float32, "compiled")
    with pytest.raises(ValueError, match="one of"):
        decode_kernel_applies(cpu, torch.float32, "fast")
