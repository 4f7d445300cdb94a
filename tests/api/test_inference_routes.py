"""The OpenAI routes against a fake engine: shapes, sampling fields, n, logprobs, SSE, errors."""

from __future__ import annotations

import json

import pytest

from tests.api.fake_engine import BASE, fake_tokens


def sse_events(text: str) -> list:
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_completion_matches_engine_output(client, engine):
    body = client.post("/v1/completions", json={"model": "alpha", "prompt": "a b c", "max_tokens": 3,
                                                "temperature": 0}).json()
    assert body["object"] == "text_completion" and body["model"] == "alpha"
    assert body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": "".join(fake_tokens("alpha", None, 3)), "logprobs": None,
                                "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_every_sampling_field_reaches_the_engine(client, engine):
    response = client.post("/v1/completions", json={
        "model": BASE, "prompt": "x", "max_tokens": 2, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 11,
        "stop": ["\n", "END"], "presence_penalty": 0.5, "frequency_penalty": -0.5, "user": "u1",
        "ignore_eos": True})
    assert response.status_code == 200, response.text
    params = engine.submitted[-1].params
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.seed) == (2, 0.7, 0.9, 5, 11)
    assert params.stop == ("\n", "END") and params.presence_penalty == 0.5 and params.frequency_penalty == -0.5
    assert params.logprobs is None and params.ignore_eos is True


def test_max_completion_tokens_wins_and_defaults_apply(client, engine):
    client.post("/v1/chat/completions", json={"model": BASE, "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 5, "max_completion_tokens": 2})
    assert engine.submitted[-1].params.max_tokens == 2
    client.post("/v1/completions", json={"model": BASE, "prompt": "x"})
    assert engine.submitted[-1].params.max_tokens == 16
    engine.context = 1000
    client.post("/v1/chat/completions", json={"model": BASE, "messages": [{"role": "user", "content": "hi"}]})
    assert engine.submitted[-1].params.max_tokens == 512
    assert engine.submitted[-1].messages == ({"role": "user", "content": "hi"},)
    assert engine.submitted[-2].messages is None and engine.submitted[-2].prompt == "x"


def test_n_choices_use_consecutive_seeds(client, engine):
    body = client.post("/v1/completions", json={"model": "beta", "prompt": ["p q", "r"], "n": 2, "seed": 7,
                                                "max_tokens": 2}).json()
    texts = [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])]
    assert texts == ["".join(fake_tokens("beta", s, 2)) for s in (7, 8, 7, 8)]
    # One engine request per prompt, n choices each; the engine seeds choice j with seed + j.
    assert [(r.prompt, r.n, r.params.seed) for r in engine.submitted] == [("p q", 2, 7), ("r", 2, 7)]
    assert len({r.request_id for r in engine.submitted}) == 2
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}


def test_chat_uses_the_template_and_openai_shape(client, engine):
    body = client.post("/v1/chat/completions", json={
        "model": "alpha", "max_tokens": 2, "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]}).json()
    # The messages go to the engine, which renders the template itself.
    assert engine.submitted[-1].messages == ({"role": "system", "content": "be brief"},
                                             {"role": "user", "content": "hello"})
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "".join(fake_tokens("alpha", None, 2))}
    assert body["choices"][0]["finish_reason"] == "length"


def test_completion_logprobs_shape(client):
    body = client.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 2,
                                                "logprobs": 2}).json()
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == fake_tokens(BASE, None, 2) and lp["token_logprobs"] == [-0.5, -0.5]
    # OpenAI's semantics: the top 2 alternatives plus the sampled token itself
    assert lp["top_logprobs"] == [{" alt0": -1.0, " alt1": -2.0, t: -0.5} for t in lp["tokens"]]
    assert lp["text_offset"] == [0, len(lp["tokens"][0])]


def test_chat_logprobs_shape(client):
    body = client.post("/v1/chat/completions", json={"model": BASE, "max_tokens": 1, "logprobs": True,
                                                     "top_logprobs": 1,
                                                     "messages": [{"role": "user", "content": "x"}]}).json()
    token = fake_tokens(BASE, None, 1)[0]
    assert body["choices"][0]["logprobs"] == {"refusal": None, "content": [{
        "token": token, "logprob": -0.5, "bytes": list(token.encode()),
        "top_logprobs": [{"token": " alt0", "logprob": -1.0, "bytes": list(b" alt0")}]}]}


def test_completion_stream_with_usage(client):
    response = client.post("/v1/completions", json={"model": "alpha", "prompt": "a b", "max_tokens": 3,
                                                    "stream": True, "stream_options": {"include_usage": True}})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "".join(fake_tokens("alpha", None, 3))
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None, None, "length"]
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3


def test_chat_stream_n2(client):
    response = client.post("/v1/chat/completions", json={"model": "beta", "max_tokens": 2, "n": 2, "seed": 1,
                                                         "stream": True,
                                                         "messages": [{"role": "user", "content": "x"}]})
    events = sse_events(response.text)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    texts = {0: "", 1: ""}
    for e in events:
        choice = e["choices"][0]
        texts[choice["index"]] += choice["delta"].get("content") or ""
    assert texts == {i: "".join(fake_tokens("beta", 1 + i, 2)) for i in (0, 1)}
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "usage" not in events[-1]


def test_models_lists_base_then_adapters(client):
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == [BASE, "alpha", "beta"]
    assert data[0]["parent"] is None and all(m["parent"] == BASE for m in data[1:])


def test_unknown_model_is_404_never_the_base(client, engine):
    response = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found" and "nope" in response.json()["error"]["message"]
    assert engine.submitted == []


def test_queue_full_is_429_with_retry_after(client, engine):
    engine.queue_full = True
    response = client.post("/v1/completions", json={"model": BASE, "prompt": "x"})
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "rate_limit_error"


def test_not_ready_is_503(client, engine):
    engine.ready = False
    assert client.get("/ready").status_code == 503
    response = client.post("/v1/chat/completions", json={"model": BASE, "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 503 and response.json()["error"]["code"] == "engine_not_ready"
    engine.ready = True
    assert client.get("/ready").json() == {"status": "ready"}
    assert client.get("/health").json() == {"status": "ok"}


def test_prompt_too_long_is_400(client):
    response = client.post("/v1/completions", json={"model": BASE, "prompt": "w " * 60, "max_tokens": 10})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_chat_template_failure_is_400(client):
    response = client.post("/v1/chat/completions", json={"model": BASE, "messages": [
        {"role": "assistant", "content": "boom"}]})
    assert response.status_code == 400 and "template" in response.json()["error"]["message"]


@pytest.mark.parametrize("patch, param", [
    ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"n": 0}, "n"), ({"n": 99}, "n"), ({"frobnicate": 1}, "frobnicate"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"logprobs": 9}, "logprobs"), ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"), ({"presence_penalty": 2.5}, "presence_penalty"), ({"model": ""}, "model"),
])
def test_invalid_completion_fields_are_400(client, engine, patch, param):
    response = client.post("/v1/completions", json={"model": BASE, "prompt": "x", **patch})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"].startswith(param)
    assert param in error["message"]
    assert engine.submitted == []


@pytest.mark.parametrize("patch, words", [
    ({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of"), ({"logit_bias": {"1": 101}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"max_tokens": 0}, "max_tokens"), ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
])
def test_unsupported_completion_options_are_refused_by_name(client, patch, words):
    response = client.post("/v1/completions", json={"model": BASE, "prompt": "x", **patch})
    assert response.status_code == 400 and words in response.json()["error"]["message"]


@pytest.mark.parametrize("patch, words", [
    ({"messages": []}, "messages"), ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]}, "messages"),
    ({"tools": [{"type": "function"}]}, "tools"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"response_format": {"type": "xml"}}, "response_format"),
])
def test_invalid_chat_fields_are_400(client, patch, words):
    body = {"model": BASE, "messages": [{"role": "user", "content": "x"}], **patch}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]["message"]


def test_bad_json_is_400(client):
    response = client.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


def test_responses_carry_a_request_id(client):
    response = client.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 1},
                           headers={"X-Request-Id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123" and response.json()["id"] == "cmpl-abc-123"
    bad = client.get("/health", headers={"X-Request-Id": "evil\tid with spaces"})
    assert bad.headers["x-request-id"] != "evil\tid with spaces"


def test_oversized_json_body_is_413(client, engine):
    from server.api.body_limit import JSON_BODY_LIMIT
    big = {"model": BASE, "prompt": "x" * (JSON_BODY_LIMIT + 10)}
    response = client.post("/v1/completions", json=big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "base-model", "prompt": "'
        for _ in range(JSON_BODY_LIMIT // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'
    response = client.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert engine.submitted == []
    assert client.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 1}).status_code == 200
