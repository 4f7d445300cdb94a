"""Incremental detokenizer: streamed pieces concatenate to the full decode, cut at the first stop string."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from server.engine.detokenizer import IncrementalDetokenizer
from server.models import embedded_model_dir

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "loraplex"
TEXTS = ["héllo wörld, ça va? naïve café 😀🎉 👩‍💻 done",
         "日本語のテキスト、中文字符和한국어 mixed with ASCII.",
         "Ünïcödé àccents ñ ø å æ œ ß — “quotes” … 🤖🚀✨ end"]


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(embedded_model_dir(CACHE))


def stream(tokenizer, ids, stop=(), prompt_ids=None, skip_special_tokens=True) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop=stop, skip_special_tokens=skip_special_tokens)
    pieces = [detok.push(t) for t in ids] + [detok.finish()]
    assert "".join(pieces) == detok.text
    return pieces, detok


def expected(tokenizer, ids, stop=(), skip_special_tokens=True) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[:min(cuts)] if cuts else text


def test_multibyte_characters_are_never_split(tokenizer):
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # the test does split characters
        pieces, detok = stream(tokenizer, ids)
        assert "".join(pieces) == text and not detok.stopped
        assert not any("\ufffd" in p for p in pieces)


def test_random_token_sequences_match_full_decode(tokenizer):
    rng = random.Random(0)
    special = tokenizer.all_special_ids
    for trial in range(300):
        ids = [rng.choice(special) if rng.random() < 0.05 else rng.randrange(len(tokenizer))
               for _ in range(rng.randint(1, 30))]
        skip = trial % 2 == 0
        pieces, _ = stream(tokenizer, ids, skip_special_tokens=skip)
        assert "".join(pieces) == expected(tokenizer, ids, skip_special_tokens=skip)


def test_prompt_context_does_not_change_the_output(tokenizer):
    prompt = tokenizer.encode("User: say something nice about 😀\nAssistant:")
    for text in TEXTS:
        ids = tokenizer.encode(" " + text)
        pieces, _ = stream(tokenizer, ids, prompt_ids=prompt)
        assert "".join(pieces) == " " + text
    broken_prompt = tokenizer.encode("ends mid emoji 😀")[:-1]  # prompt ends inside a character
    pieces, _ = stream(tokenizer, tokenizer.encode(" ok"), prompt_ids=broken_prompt)
    assert "".join(pieces) == " ok"


def test_stop_string_spanning_tokens_is_cut(tokenizer):
    ids = tokenizer.encode("Hello world, the END is near")
    stop = "lo wor"  # spans the "Hello" / " world" boundary
    detok = IncrementalDetokenizer(tokenizer, None, stop=[stop, "END"])
    pieces = [detok.push(t) for t in ids]
    assert detok.stopped and "".join(pieces) == "Hel" and detok.text == "Hel"
    assert detok.push(ids[0]) == "" and detok.finish() == ""


def test_partial_stop_is_held_then_released(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, None, stop=["###"])
    assert detok.push(tokenizer.encode("a")[0]) == "a"
    assert [detok.push(t) for t in tokenizer.encode(" #")] == [" "]  # "#" may begin "###": held
    assert detok.push(tokenizer.encode("!")[0]) == "#!"  # resolved: not a stop after all
    assert detok.finish() == "" and detok.text == "a #!" and not detok.stopped
    held = IncrementalDetokenizer(tokenizer, None, stop=["###"])
    assert [held.push(t) for t in tokenizer.encode("##")] == [""] * len(tokenizer.encode("##"))
    assert held.finish() == "##" and not held.stopped  # flushed at the end


def test_random_stop_strings_match_cut_decode(tokenizer):
    rng = random.Random(1)
    for trial in range(300):
        text = rng.choice(TEXTS) if trial % 2 else " ".join(rng.choice(TEXTS).split()[::-1])
        ids = tokenizer.encode(text) if trial % 3 else [rng.randrange(len(tokenizer)) for _ in range(20)]
        full = tokenizer.decode(ids)
        start = rng.randrange(len(full))
        stops = [full[start:start + rng.randint(1, 6)], rng.choice(["zz", "é😀", "世界", "\n"])]
        pieces, detok = stream(tokenizer, ids, stop=stops)
        assert "".join(pieces) == expected(tokenizer, ids, stops)
        assert detok.stopped == any(s in full for s in stops)


class CountingTokenizer:
    """Wraps a tokenizer, recording the length of every decoded id window."""

    def __init__(self, inner):
        self.inner, self.windows = inner, []

    def decode(self, ids, **kwargs):
        self.windows.append(len(ids))
        return self.inner.decode(ids, **kwargs)


def test_decodes_only_a_small_window(tokenizer):
    ids = tokenizer.encode(" ".join(TEXTS * 10))
    counting = CountingTokenizer(tokenizer)
    pieces, _ = stream(counting, ids, stop=["never appears"])
    assert "".join(pieces) == tokenizer.decode(ids)
    assert len(ids) > 300 and max(counting.windows) <= 12
    assert len(counting.windows) <= 2 * len(ids) + 4
