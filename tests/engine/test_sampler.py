"""Vectorised sampler: greedy, per-seed reproducibility, truncation, penalties, logprobs."""

from __future__ import annotations

import torch

from server.engine.sampler import Sampler, SamplingOptions, make_generator

VOCAB = 64
sampler = Sampler()


def random_logits(rows: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def tokens(logits: torch.Tensor, options: list[SamplingOptions], generators=None, output_ids=None) -> list[int]:
    generators = generators or [make_generator(o.seed) for o in options]
    return [o.token for o in sampler.sample(logits, options, generators, output_ids)]


def test_greedy_is_argmax_and_needs_no_generator():
    logits = random_logits(8, 0)
    out = tokens(logits, [SamplingOptions(temperature=0.0)] * 8, [None] * 8)
    assert out == logits.argmax(-1).tolist()


def test_top_k_1_and_tiny_top_p_equal_greedy():
    logits = random_logits(16, 1).to(torch.bfloat16)
    greedy = logits.float().argmax(-1).tolist()
    assert tokens(logits, [SamplingOptions(top_k=1, seed=i) for i in range(16)]) == greedy
    assert tokens(logits, [SamplingOptions(top_p=1e-6, seed=i) for i in range(16)]) == greedy


def run_steps(position: int, companions: list[SamplingOptions], target: SamplingOptions, steps: int = 12) -> list[int]:
    """The target's tokens over `steps` steps, placed at `position` among `companions`."""
    options = companions[:position] + [target] + companions[position:]
    generators = [make_generator(o.seed) for o in options]
    history: list[list[int]] = [[] for _ in options]
    out = []
    for step in range(steps):
        logits = random_logits(len(options), 1000 + step)
        logits[position] = random_logits(1, step)[0]  # the target always sees the same logits
        for h, o in zip(history, sampler.sample(logits, options, generators, history)):
            h.append(o.token)
        out.append(history[position][-1])
    return out


def test_same_seed_same_tokens_whatever_the_batch():
    companions = [SamplingOptions(temperature=0.0), SamplingOptions(top_k=3, seed=1), SamplingOptions(seed=5),
                  SamplingOptions(presence_penalty=1.0, frequency_penalty=0.5, logprobs=2, seed=7)]
    for target in (SamplingOptions(temperature=1.3, top_p=0.95, seed=42), SamplingOptions(seed=42)):
        alone = run_steps(0, [], target)
        assert alone == run_steps(2, companions, target) == run_steps(4, companions, target)
        assert alone != run_steps(0, [], SamplingOptions(temperature=1.3, top_p=0.95, seed=43))


def test_different_seeds_differ():
    logits = torch.zeros(1, VOCAB)  # uniform: a collision of 20 draws is astronomically unlikely
    draws = {seed: [tokens(logits, [SamplingOptions()], [g])[0] for g in [make_generator(seed)] for _ in range(20)]
             for seed in (1, 2)}
    assert draws[1] != draws[2]


def draw_counts(logits: torch.Tensor, options: SamplingOptions, n: int, seed: int = 0) -> torch.Tensor:
    """Counts per token of n draws from one row, as one batch sharing one generator."""
    g = make_generator(seed)
    out = tokens(logits.expand(n, -1), [options] * n, [g] * n)
    return torch.bincount(torch.tensor(out), minlength=logits.shape[-1]).float()


def chi_square(observed: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * observed.sum()
    keep = expected > 0
    assert observed[~keep].sum() == 0, "drew a token with zero probability"
    return float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_temperature_sampling_matches_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    for temperature in (1.0, 0.5, 2.0):
        counts = draw_counts(logits, SamplingOptions(temperature=temperature), 4000)
        # 5 degrees of freedom: p(chi2 > 30) ~ 1e-5.
        assert chi_square(counts, (logits[0] / temperature).softmax(-1)) < 30


def test_top_k_and_top_p_truncate_then_renormalise():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    logits = probs.log().unsqueeze(0)
    kept_two = torch.tensor([0.5, 0.3, 0, 0, 0]) / 0.8
    # top_p=0.7: mass before rank 1 is 0.5 < 0.7 (kept), before rank 2 is 0.8 (dropped).
    assert chi_square(draw_counts(logits, SamplingOptions(top_p=0.7), 2000), kept_two) < 20
    assert chi_square(draw_counts(logits, SamplingOptions(top_k=2), 2000), kept_two) < 20
    assert chi_square(draw_counts(logits, SamplingOptions(top_p=0.85), 2000),
                      torch.tensor([0.5, 0.3, 0.1, 0, 0]) / 0.9) < 20


def test_presence_and_frequency_penalties_shift_argmax():
    logits = torch.tensor([[2.0, 1.9, 1.5, 0.0]])
    greedy = SamplingOptions(temperature=0.0, presence_penalty=0.5)
    assert tokens(logits, [greedy], [None], [[0]]) == [1]
    assert tokens(logits, [greedy], [None], [[3]]) == [0]
    freq = SamplingOptions(temperature=0.0, frequency_penalty=0.2)
    logits2 = torch.tensor([[2.0, 1.5, 1.0, 0.0]])
    assert tokens(logits2, [freq], [None], [[0]]) == [0]  # 2.0 - 0.2 = 1.8 > 1.5
    assert tokens(logits2, [freq], [None], [[0, 0, 0]]) == [1]  # 2.0 - 0.6 = 1.4 < 1.5: scales with count
    both = SamplingOptions(temperature=0.0, presence_penalty=0.3, frequency_penalty=0.1, logprobs=4)
    out = sampler.sample(logits, [both], [None], [[0, 0, 1]])[0]
    penalised = logits[0] - torch.tensor([0.3 + 0.2, 0.3 + 0.1, 0.0, 0.0])
    assert out.token == int(penalised.argmax())
    expected = dict(zip(range(4), penalised.log_softmax(-1).tolist()))
    assert all(abs(lp - expected[t]) < 1e-6 for t, lp in out.top_logprobs)


def test_logprobs_are_log_softmax_and_sorted():
    logits = random_logits(4, 3).to(torch.float16)
    options = [SamplingOptions(logprobs=5, seed=1), SamplingOptions(temperature=0.0, logprobs=0),
               SamplingOptions(seed=2), SamplingOptions(temperature=0.7, logprobs=2, seed=3)]
    out = sampler.sample(logits, options, [make_generator(o.seed) for o in options])
    reference = logits.float().log_softmax(-1)
    for row, (o, s) in enumerate(zip(options, out)):
        if o.logprobs is None:
            assert s.logprob is None and s.top_logprobs is None
            continue
        assert abs(s.logprob - reference[row, s.token].item()) < 1e-5
        assert len(s.top_logprobs) == o.logprobs
        values = [lp for _, lp in s.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert values == reference[row].topk(o.logprobs).values.tolist()
        assert all(abs(lp - reference[row, t].item()) < 1e-6 for t, lp in s.top_logprobs)
