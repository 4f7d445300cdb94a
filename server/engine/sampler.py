"""Next-token selection for a whole batch in one vectorised pass over the last-token logits.

Order of operations per row: OpenAI presence/frequency penalties -> logit bias -> banned tokens
(end-of-sequence before min_tokens) -> structured-output mask (tokens the row's grammar forbids get
-inf) -> (logprobs taken here) -> temperature -> top-k -> top-p ->
inverse-CDF draw with one uniform from the row's own generator. Rows with temperature 0 take the
argmax of the penalised, masked logits.

Reproducibility: each sequence owns a CPU `torch.Generator`; a sampled row consumes exactly one
uniform from it per step and every tensor op is row-wise, so a given seed yields the same tokens
whatever else shares the batch and at whatever batch position.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingOptions:
    """Per-sequence sampling settings (OpenAI semantics)."""

    temperature: float = 1.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # keep the smallest prefix of the sorted distribution with mass >= top_p
    top_k: int = 0  # 0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None = off; k >= 0 = chosen token's logprob plus top-k alternatives
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, value added to its logit)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class SampleOutput:
    """One sequence's chosen token; logprobs are None unless requested."""

    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # most likely first
    rank: int = 0  # of the chosen token in the distribution its logprob comes from (1 = most likely)


def make_generator(seed: int | None) -> torch.Generator:
    """The per-sequence CPU generator: seeded from `seed`, or from a fresh random seed if None."""
    return torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))


class Sampler:
    """Stateless; the engine owns the per-sequence generators and generated-token histories."""

    @torch.inference_mode()
    def sample(self, logits: Tensor, options: Sequence[SamplingOptions],
               generators: Sequence[torch.Generator | None],
               output_ids: Sequence[Sequence[int]] | None = None,
               allowed: tuple[Sequence[int], Tensor] | None = None,
               banned: Sequence[Sequence[int]] | None = None) -> list[SampleOutput]:
        """Pick one token per row.

        logits: [B, V] last-token logits, any float dtype/device (computed in float32).
        options, generators: length B. A generator may be None only for greedy rows (a sampled row
            with None falls back to torch's global RNG and is then not reproducible).
        output_ids: length B, the tokens each sequence has generated so far (for the penalties).
        allowed: (rows, mask) for constrained rows: mask is bool [len(rows), V'] (V' <= V; tokens past V'
            are forbidden), True where the row's grammar allows the token. Other rows are free.
        banned: length B, token ids each row may not pick this step (end-of-sequence before min_tokens).

        Logprobs are the log_softmax of the *penalised* logits before temperature/top-k/top-p, i.e.
        the model's distribution as adjusted by the request's penalties, independent of how
        adventurous the sampling is.
        """
        x = logits.detach().to(torch.float32)
        x = apply_penalties(x, options, output_ids)
        x = apply_bias(x, options, banned)
        if allowed is not None:
            x = apply_allowed(x, *allowed)
        tokens = x.argmax(dim=-1)
        sampled = [i for i, o in enumerate(options) if not o.greedy]
        if sampled:
            rows = torch.tensor(sampled, device=x.device)
            uniforms = draw_uniforms([generators[i] for i in sampled]).to(x.device)
            tokens[rows] = sample_rows(x[rows], [options[i] for i in sampled], uniforms)
        return attach_logprobs(x, tokens, options)


def apply_penalties(x: Tensor, options: Sequence[SamplingOptions],
                    output_ids: Sequence[Sequence[int]] | None) -> Tensor:
    """x[b, t] -= presence[b] * (count[b, t] > 0) + frequency[b] * count[b, t]; x: [B, V]."""
    if output_ids is None or not any(o.presence_penalty or o.frequency_penalty for o in options):
        return x
    counts = token_counts(output_ids, x.shape[1], x.device)
    presence = x.new_tensor([o.presence_penalty for o in options]).unsqueeze(1)
    frequency = x.new_tensor([o.frequency_penalty for o in options]).unsqueeze(1)
    return x - presence * (counts > 0) - frequency * counts


def apply_bias(x: Tensor, options: Sequence[SamplingOptions], banned: Sequence[Sequence[int]] | None) -> Tensor:
    """x plus each row's logit bias, with -inf on its banned tokens: one sparse update over the whole batch."""
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for b, o in enumerate(options):
        for token, bias in o.logit_bias:
            rows.append(b)
            cols.append(token)
            values.append(bias)
        for token in banned[b] if banned is not None else ():
            rows.append(b)
            cols.append(token)
            values.append(float("-inf"))
    if not rows:
        return x
    index = (torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device))
    return x.index_put(index, x.new_tensor(values), accumulate=True)


def apply_allowed(x: Tensor, rows: Sequence[int], mask: Tensor) -> Tensor:
    """x with -inf where a constrained row's mask forbids the token: one masked_fill over those rows."""
    allowed = mask.to(x.device)
    if allowed.shape[1] != x.shape[1]:  # a vocabulary padded past the tokenizer's: the padding is forbidden
        padded = torch.zeros(len(rows), x.shape[1], dtype=torch.bool, device=x.device)
        width = min(allowed.shape[1], x.shape[1])
        padded[:, :width] = allowed[:, :width]
        allowed = padded
    index = torch.tensor(list(rows), dtype=torch.long, device=x.device)
    return x.index_put((index,), x[index].masked_fill(~allowed, float("-inf")))


def token_counts(output_ids: Sequence[Sequence[int]], vocab: int, device: torch.device) -> Tensor:
    """[B, V] float32 occurrence counts, built with one scatter over all histories."""
    counts = torch.zeros(len(output_ids), vocab, dtype=torch.float32, device=device)
    rows = [b for b, ids in enumerate(output_ids) for _ in ids]
    if rows:
        cols = torch.tensor([t for ids in output_ids for t in ids], dtype=torch.long, device=device)
        counts.index_put_((torch.tensor(rows, device=device), cols),
                          torch.ones(len(rows), device=device), accumulate=True)
    return counts


def draw_uniforms(generators: Sequence[torch.Generator | None]) -> Tensor:
    """[R] uniforms in [0, 1), one from each row's own generator (the only per-row loop)."""
    return torch.cat([torch.rand(1, generator=g) for g in generators])


def sample_rows(x: Tensor, options: Sequence[SamplingOptions], uniforms: Tensor) -> Tensor:
    """Token ids [R] drawn from penalised logits x [R, V] after temperature, top-k and top-p.

    Only rows that truncate pay for a vocabulary sort; which path a row takes depends on its own
    options alone, so batch companions never change its result.
    """
    scaled = x / x.new_tensor([o.temperature for o in options]).unsqueeze(1)
    truncated = torch.tensor([0 < o.top_k < x.shape[1] or o.top_p < 1.0 for o in options], device=x.device)
    tokens = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    if not bool(truncated.all()):
        plain = ~truncated
        tokens[plain] = inverse_cdf(scaled[plain].softmax(dim=-1), uniforms[plain])
    if bool(truncated.any()):
        picked = [o for o, t in zip(options, truncated.tolist()) if t]
        tokens[truncated] = sample_truncated(scaled[truncated], picked, uniforms[truncated])
    return tokens


def sample_truncated(scaled: Tensor, options: Sequence[SamplingOptions], uniforms: Tensor) -> Tensor:
    """Token ids [R] from temperature-scaled logits [R, V] restricted by top-k, then top-p."""
    vocab = scaled.shape[1]
    top_k = torch.tensor([o.top_k if 0 < o.top_k < vocab else vocab for o in options], device=scaled.device)
    top_p = scaled.new_tensor([o.top_p for o in options]).unsqueeze(1)
    # Stable sort: ties keep vocabulary order, so a row's result is the same in any batch.
    sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab, device=scaled.device)
    probs = sorted_logits.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf")).softmax(dim=-1)
    # Keep rank j while the mass strictly before it is < top_p (smallest set reaching top_p);
    # rank 0 is always kept.
    keep = (probs.cumsum(dim=-1) - probs < top_p) | (ranks == 0)
    choice = inverse_cdf(probs * keep, uniforms)
    return order.gather(1, choice.unsqueeze(1)).squeeze(1)


def inverse_cdf(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Index [R] of the first entry whose cumulative mass exceeds u * total, per row of probs [R, N].

    Unnormalised probs are fine. Zero-mass entries are never chosen: the strict `>` skips them and
    the clamp covers u * total rounding up to total.
    """
    cdf = probs.cumsum(dim=-1)
    choice = torch.searchsorted(cdf, uniforms.unsqueeze(1) * cdf[:, -1:], right=True).squeeze(1)
    last_positive = (probs > 0).to(torch.int32).cumsum(dim=-1).argmax(dim=-1)
    return torch.minimum(choice, last_positive)


def attach_logprobs(x: Tensor, tokens: Tensor, options: Sequence[SamplingOptions]) -> list[SampleOutput]:
    """Wrap tokens [B] as outputs, with log_softmax(x) values for rows that asked for logprobs."""
    token_list = tokens.tolist()
    wanted = [o.logprobs for o in options]
    if all(k is None for k in wanted):
        return [SampleOutput(t) for t in token_list]
    logprobs = x.log_softmax(dim=-1)
    chosen_t = logprobs.gather(1, tokens.unsqueeze(1))
    ranks = (logprobs > chosen_t).sum(dim=-1).add(1).tolist()
    chosen = chosen_t.squeeze(1).tolist()
    max_k = min(max(k or 0 for k in wanted), x.shape[1])
    top_values_t, top_ids_t = logprobs.topk(max_k, dim=-1) if max_k else (logprobs[:, :0], tokens[:, None][:, :0])
    top_values, top_ids = top_values_t.tolist(), top_ids_t.tolist()
    outputs = []
    for b, (token, k) in enumerate(zip(token_list, wanted)):
        if k is None:
            outputs.append(SampleOutput(token))
        else:
            top = list(zip(top_ids[b][:k], top_values[b][:k]))
            outputs.append(SampleOutput(token, chosen[b], top, ranks[b]))
    return outputs


TOKEN_LOGPROB_ROWS = 256  # rows per pass: bounds the float32 copies of a long prompt's [rows, vocab] logits


@torch.inference_mode()
def token_logprobs(logits: Tensor, targets: Tensor, k: int) -> list[SampleOutput]:
    """Logprob and rank of `targets [R]` under the model's own distribution `logits [R, V]` (no penalty,
    bias or mask: what the model assigns to a given text), with the top k of each row."""
    outputs: list[SampleOutput] = []
    for start in range(0, len(targets), TOKEN_LOGPROB_ROWS):
        x = logits[start:start + TOKEN_LOGPROB_ROWS].detach().to(torch.float32)
        rows = targets[start:start + TOKEN_LOGPROB_ROWS].to(x.device)
        outputs += attach_logprobs(x, rows, [SamplingOptions(logprobs=k)] * len(rows))
    return outputs
