"""The 64x32-short benchmark's pieces: prompts of the drawn word counts, the adapters' spread, the table."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.burst_http import render, spread, word_prompts  # noqa: E402


class Words:
    """A tokenizer stand-in: token i decodes to a word (or to punctuation, which prompts never use)."""

    def decode(self, ids: list[int]) -> str:
        return " ," if ids[0] % 7 == 0 else f" w{chr(97 + ids[0] % 26)}{chr(97 + ids[0] // 26 % 26)}"


def test_prompts_have_the_drawn_word_counts_of_whole_words():
    prompts = word_prompts(Words(), 50, (10, 130), seed=0)
    counts = [len(p.split()) for p in prompts]
    assert min(counts) >= 10 and max(counts) <= 130 and len(set(counts)) > 20
    assert all(word.isalpha() for p in prompts for word in p.split())
    assert prompts == word_prompts(Words(), 50, (10, 130), seed=0)  # the same prompts in every run


def test_spread_gives_each_adapter_its_share():
    models = spread(["a", "b", "c", "d"], 64)
    assert {m: models.count(m) for m in set(models)} == {"a": 16, "b": 16, "c": 16, "d": 16}


def test_table_gives_fastest_runs_and_ratios_to_base():
    runs = {"base": [{"tok_s": 100.0, "ttft_p50_ms": 900}, {"tok_s": 120.0, "ttft_p50_ms": 800}],
            "resident": [{"tok_s": 114.0, "ttft_p50_ms": 850}], "cold": [{"tok_s": 96.0, "ttft_p50_ms": 1500}]}
    text = render({"runs": runs, "best": {"base": 120.0}, "order": ["base", "resident", "cold", "base"],
                   "requests": 64, "adapters": 32, "rank": 16, "threads": 2, "words": [10, 130], "new_tokens": 64,
                   "flags": ["--no-prefix-cache"], "cold": 24, "pool": {"adapters": 56}})
    assert "| resident | 114.0 | 114.0 | 0.95 | 850 | >= 0.95 |" in text
    assert "| cold | 96.0 | 96.0 | 0.80 | 1500 | >= 0.90 |" in text
    assert "| base | 100.0, 120.0 | 120.0 | 1.00 |" in text
