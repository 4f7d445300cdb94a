"""The start-up check that the engine computes a model exactly, before the server says it is ready.

A model whose modeling code does something the paged attention does not implement would otherwise
start, report ready, and then fail (or, worse, answer wrongly) on every request. So at load the
engine runs one short probe: two sequences over the real KV cache, as packed steps of every kind the
scheduler makes (a first prefill chunk, a later chunk over cached blocks beside another sequence's
first chunk, decode steps of both), and compares each step's logits with the model's own eager
forward over the same tokens. The probe's sequences outgrow a small sliding window, so windows the
size of a test model's are exercised too; larger windows are covered by the attention tests. A probe
that raises or differs refuses the model with an `UnsupportedModelError` that names the architecture
and what went wrong.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from server.engine.attention import PAGED_ATTENTION, PagedModel, StepForward, UnsupportedModelError, packed_forward
from server.engine.kv_cache import KVCache
from server.engine.lean_forward import LeanForward, lean_forward_supported
from server.quant.linear import QuantLinear

log = logging.getLogger(__name__)
# The transformers path's probe results per model (and the cache they ran on), kept from `probe_model` until
# `lean_forward_for` takes them: the same steps need not run twice at start-up.
_PAGED_RESULTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

PROBE_TOKENS = 20        # the probe's longer sequence, unless a small window asks for more
MAX_WINDOW_PROBED = 64   # a sliding window up to this many tokens is outgrown by the probe
FLOAT32_TOLERANCE = 2e-3  # largest log-probability difference allowed (fp32: summation order only)
HALF_TOLERANCE = 0.5      # fp16/bf16: rounding of two different summation orders
LEAN_TOLERANCE = 1e-4     # the lean decoder against the transformers path: the same float ops in the same order
# Config settings that change attention in ways the paged attention does not implement: named in the
# refusal when the probe differs, so the user learns which one.
UNSUPPORTED_SETTINGS = ("attention_chunk_size", "use_alibi", "alibi", "attn_logit_scaling", "use_bidirectional_attention")


@torch.inference_mode()
def probe_model(paged: PagedModel, kv_cache: KVCache, decode_kernel: bool) -> float:
    """Check the packed, paged forward against the model's eager forward; returns the largest
    log-probability difference seen, or raises `UnsupportedModelError`."""
    model = paged.model
    arch = type(model).__name__
    first, second = _probe_prompts(model.config, kv_cache.device)
    try:
        with _exact_linears(model):
            expected = [_eager_logprobs(model, ids) for ids in (first, second)]
            got = _paged_logprobs(paged, kv_cache, first, second, decode_kernel)
    except Exception as exc:  # any failure of the modeling code on our steps means: cannot serve it
        raise UnsupportedModelError(f"{arch} cannot be served: the packed forward failed ({type(exc).__name__}: "
                                    f"{exc}){_suspects(model)}") from exc
    _PAGED_RESULTS[model] = (kv_cache, got)  # the lean decoder's start-up check compares with these
    worst = 0.0
    for seq, positions, logprobs in got:
        reference = expected[seq][positions]
        top = reference.topk(min(5, reference.shape[-1]), dim=-1).indices
        worst = max(worst, float((logprobs.gather(-1, top) - reference.gather(-1, top)).abs().max()))
    tolerance = FLOAT32_TOLERANCE if kv_cache.dtype == torch.float32 else HALF_TOLERANCE
    if not worst <= tolerance:
        raise UnsupportedModelError(f"{arch} cannot be served exactly: the packed forward differs from the model's "
                                    f"own by {worst:.3g} in log-probability (tolerance {tolerance}){_suspects(model)}")
    return worst


@contextmanager
def _exact_linears(model: PreTrainedModel) -> Iterator[None]:
    """Quantized linears in their exact mode while probing: int8 activations (`--quant-compute int8`) change
    decode rows by design, and the probe checks the attention path, not that documented deviation."""
    int8 = [m for m in model.modules() if isinstance(m, QuantLinear) and m.int8]
    for module in int8:
        module.int8 = False
    try:
        yield
    finally:
        for module in int8:
            module.int8 = True


def _probe_prompts(config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two fixed pseudo-random prompts, the first long enough to outgrow a small sliding window."""
    window = getattr(config, "sliding_window", None) or 0
    length = max(PROBE_TOKENS, window + 12) if window <= MAX_WINDOW_PROBED else PROBE_TOKENS
    vocab = int(config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(min(100, vocab // 2), vocab, (length + length // 2,), generator=generator)
    return ids[:length].to(device), ids[length:].to(device)


def _eager_logprobs(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities after every prefix of `ids`, by the model's own eager attention: `[len, vocab]`."""
    model.set_attn_implementation("eager")
    try:
        return torch.log_softmax(model(input_ids=ids[None], use_cache=False).logits[0].float(), dim=-1)
    finally:
        model.set_attn_implementation(PAGED_ATTENTION)


def _paged_logprobs(paged: PagedModel, kv_cache: KVCache, first: torch.Tensor, second: torch.Tensor,
                    decode_kernel: bool, forward: StepForward | None = None) -> list[tuple[int, int, torch.Tensor]]:
    """`(sequence, position, log-probabilities)` of each probe step's rows, the steps the scheduler makes:
    a first chunk of `first`; its next chunk (up to 3 tokens short of its end) beside all of `second`
    but its last 3 tokens; then 3 decode steps of both."""
    a, b = first.tolist(), second.tolist()
    split, a_end, b_end = len(a) // 2, len(a) - 3, len(b) - 3
    tables = [kv_cache.allocator.allocate(kv_cache.blocks_for(len(ids))) for ids in (a, b)]
    try:
        steps = [[(0, 0, split)], [(0, split, a_end), (1, 0, b_end)]]
        steps += [[(0, a_end + i, a_end + i + 1), (1, b_end + i, b_end + i + 1)] for i in range(3)]
        results = []
        for step in steps:
            seqs = [((a, b)[seq][start:end], end, tables[seq]) for seq, start, end in step]
            logits = packed_forward(paged, kv_cache, seqs, decode_kernel, forward)
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            results += [(seq, end - 1, logprobs[row]) for row, (seq, _, end) in enumerate(step)]
        return results
    finally:
        for table in tables:
            kv_cache.allocator.free(table)


@torch.inference_mode()
def lean_forward_for(paged: PagedModel, kv_cache: KVCache, decode_kernel: bool) -> LeanForward | None:
    """The lean decoder forward (server/engine/lean_forward.py) for this model, if it supports it and gives the
    transformers path's log-probabilities on the probe's steps (within `LEAN_TOLERANCE`); else None, logged."""
    why = lean_forward_supported(paged, kv_cache, decode_kernel)
    if why is not None:
        log.info("the transformers forward runs every step (the lean decoder does not apply: %s)", why)
        return None
    lean = LeanForward(paged)
    first, second = _probe_prompts(paged.model.config, kv_cache.device)
    try:
        with _exact_linears(paged.model):
            cached = _PAGED_RESULTS.pop(paged.model, None)
            expected = cached[1] if cached is not None and cached[0] is kv_cache else \
                _paged_logprobs(paged, kv_cache, first, second, decode_kernel)
            got = _paged_logprobs(paged, kv_cache, first, second, decode_kernel, lean)
    except Exception as exc:  # noqa: BLE001 - any failure means: keep the transformers forward
        log.warning("the lean decoder failed its start-up check (%s: %s); the transformers forward runs every step",
                    type(exc).__name__, exc)
        return None
    worst = 0.0
    for (_, _, reference), (_, _, logprobs) in zip(expected, got):
        top = reference.topk(min(5, reference.shape[-1]), dim=-1).indices
        worst = max(worst, float((logprobs.gather(-1, top) - reference.gather(-1, top)).abs().max()))
    if not worst <= LEAN_TOLERANCE:
        log.warning("the lean decoder differs from the transformers forward by %.3g in log-probability; the "
                    "transformers forward runs every step", worst)
        return None
    log.info("the lean decoder runs every step (start-up check: %.2g from the transformers forward)", worst)
    return lean


def _suspects(model: torch.nn.Module) -> str:
    """The config's settings the paged attention does not implement, as a clause of the refusal."""
    config = model.config
    found = [f"{name}={getattr(config, name)!r}" for name in UNSUPPORTED_SETTINGS if getattr(config, name, None)]
    return f"; its config sets {', '.join(found)}, which the paged attention does not implement" if found else ""
