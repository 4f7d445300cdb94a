"""The HTTP layer's side of OpenAI's prompt forms, echo, vLLM's prompt_logprobs, logit_bias and min_tokens,
on the fake engine (fast; the numbers themselves are checked against PEFT in test_openai_compat.py)."""

from __future__ import annotations

import json

import pytest

from tests.api.conftest import ADMIN_HEADERS
from tests.api.fake_engine import BASE, fake_tokens


def complete(client, **body) -> dict:
    response = client.post("/v1/completions", json={"model": BASE, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("prompt, ids", [("w1 w2", None), ([5, 6, 7], [(5, 6, 7)]),
                                         ([[1, 2], [3, 4, 5]], [(1, 2), (3, 4, 5)]), (["a b", "c"], None)])
def test_every_prompt_form(client, engine, prompt, ids):
    body = complete(client, prompt=prompt, n=2, max_tokens=2)
    prompts = len(ids) if ids else (1 if isinstance(prompt, str) else len(prompt))
    assert [c["index"] for c in body["choices"]] == list(range(2 * prompts))
    words = [len(p) for p in ids] if ids else [len(p.split()) for p in ([prompt] if isinstance(prompt, str) else prompt)]
    assert body["usage"] == {"prompt_tokens": sum(words), "completion_tokens": 4 * prompts,
                             "total_tokens": sum(words) + 4 * prompts}
    submitted = engine.submitted[-prompts:]
    assert [r.prompt_ids for r in submitted] == (ids or [None] * prompts)


def test_a_token_id_outside_the_vocabulary_is_named(client):
    response = client.post("/v1/completions", json={"model": BASE, "prompt": [[1, 2], [3, 1000]]})
    assert response.status_code == 400 and "1000" in response.json()["error"]["message"]


def test_echo_puts_the_prompt_first(client):
    body = complete(client, prompt="w1 w2", max_tokens=2, echo=True)
    assert body["choices"][0]["text"] == "w1 w2" + "".join(fake_tokens(BASE, None, 2))
    scored = complete(client, prompt=[7, 8, 9], max_tokens=0, echo=True, logprobs=1)
    choice = scored["choices"][0]
    assert choice["text"] == "w7 w8 w9" and choice["finish_reason"] == "length"
    assert scored["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert lp["tokens"] == ["w7", "w8", "w9"] and lp["token_logprobs"] == [None, -0.25, -0.25]
    assert lp["top_logprobs"] == [None, {"alt0": -0.1, "w8": -0.25}, {"alt0": -0.1, "w9": -0.25}]
    assert lp["text_offset"] == [0, 2, 4]


def test_echo_streamed_sends_the_prompt_in_the_first_chunk(client):
    with client.stream("POST", "/v1/completions", json={"model": BASE, "prompt": "w1 w2", "max_tokens": 2,
                                                        "echo": True, "logprobs": 0, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == "w1 w2" + "".join(fake_tokens(BASE, None, 2))
    first = chunks[0]["choices"][0]["logprobs"]
    assert first["tokens"][:2] == ["w1", "w2"] and first["token_logprobs"][0] is None
    assert chunks[1]["choices"][0]["logprobs"]["text_offset"] == [len("w1 w2") + len(texts[0]) - len("w1 w2")]


def test_prompt_logprobs_as_vllm_sends_them(client):
    choice = complete(client, prompt="w1 w2", max_tokens=1, prompt_logprobs=1)["choices"][0]
    assert choice["prompt_logprobs"] == [None, {"900": {"logprob": -0.1, "rank": 1, "decoded_token": "alt0"},
                                               "1": {"logprob": -0.25, "rank": 3, "decoded_token": "w2"}}]
    assert "prompt_logprobs" not in complete(client, prompt="w1", max_tokens=1)["choices"][0]
    chat = client.post("/v1/chat/completions", json={"model": BASE, "max_tokens": 0, "prompt_logprobs": 0,
                                                     "messages": [{"role": "user", "content": "hi there"}]}).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"][1]) == 1
    assert chat["choices"][0]["message"]["content"] == ""


def test_prompt_logprobs_are_refused_on_streamed_chat(client):
    response = client.post("/v1/chat/completions", json={"model": BASE, "stream": True, "prompt_logprobs": 1,
                                                         "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400 and "prompt_logprobs" in response.json()["error"]["message"]


def test_logit_bias_and_min_tokens_reach_the_engine(client, engine):
    complete(client, prompt="x", max_tokens=3, logit_bias={"5": -100, "7": 2.5}, min_tokens=2)
    params = engine.submitted[-1].params
    assert params.logit_bias == ((5, -100.0), (7, 2.5)) and params.min_tokens == 2


def test_unload_checks_its_name_as_load_does(client):
    for name in ("", "../x"):
        response = client.post("/v1/unload_lora_adapter", json={"lora_name": name}, headers=ADMIN_HEADERS)
        assert response.status_code == 400 and response.json()["error"]["param"] == "lora_name"
