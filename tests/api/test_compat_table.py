"""docs/api.md's vLLM and OpenAI compatibility table, kept true: one check per row, on the real app with the fake
engine (the logprob values row on the real sampler), and the table and the checks name the same features."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.engine.sampler import Sampler, SamplingOptions
from tests.api.conftest import ADMIN_HEADERS
from tests.api.fake_engine import BASE

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
CHAT = {"model": BASE, "messages": [{"role": "user", "content": "hi there"}]}


def table_features() -> list[str]:
    text = API_DOC.read_text()
    table = text[text.index("<!-- compat-table -->"):text.index("<!-- /compat-table -->")]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    return rows[2:]  # after the header and its rule


def post(client, body: dict, route: str = "/v1/completions", status: int = 200) -> dict:
    response = client.post(route, json={"model": BASE, **body})
    assert response.status_code == status, response.text
    return response.json()


def error(client, body: dict, route: str = "/v1/completions") -> str:
    return post(client, body, route, 400)["error"]["message"]


def prompt_forms(client, engine):
    for prompt in ("a b", ["a", "b c"], [1, 2], [[1, 2], [3]]):
        post(client, {"prompt": prompt, "max_tokens": 1})
    assert "5000" in error(client, {"prompt": [[1, 5000]]})


def prompts_with_n(client, engine):
    body = post(client, {"prompt": ["a b", "c"], "n": 2, "max_tokens": 1})
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 3 and body["usage"]["completion_tokens"] == 4


def echo(client, engine):
    choice = post(client, {"prompt": "a b", "max_tokens": 0, "echo": True, "logprobs": 0})["choices"][0]
    assert choice["text"] == "a b" and choice["logprobs"]["token_logprobs"][0] is None


def max_tokens_zero(client, engine):
    assert "max_tokens" in error(client, {"prompt": "a", "max_tokens": 0})
    post(client, {"prompt": "a b", "max_tokens": 0, "prompt_logprobs": 0})


def completion_logprobs(client, engine):
    lp = post(client, {"prompt": "a", "max_tokens": 2, "logprobs": 0})["choices"][0]["logprobs"]
    assert [list(t) for t in lp["top_logprobs"]] == [[t] for t in lp["tokens"]]
    error(client, {"prompt": "a", "logprobs": 6})


def chat_top_logprobs(client, engine):
    content = post(client, {**CHAT, "max_tokens": 1, "logprobs": True, "top_logprobs": 2},
                   "/v1/chat/completions")["choices"][0]["logprobs"]["content"]
    assert [len(c["top_logprobs"]) for c in content] == [2]
    error(client, {**CHAT, "logprobs": True, "top_logprobs": 21}, "/v1/chat/completions")


def logprob_values(client, engine):
    """After penalties and bias, before temperature: the logprob of the adjusted distribution."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0]])
    options = [SamplingOptions(temperature=1.5, presence_penalty=1.0, logprobs=1, logit_bias=((3, 2.0),))]
    out = Sampler().sample(logits, options, [torch.Generator().manual_seed(0)], [[0]])[0]
    adjusted = torch.tensor([1.0, 1.0, 0.5, 2.0]).log_softmax(dim=-1)
    assert abs(out.logprob - float(adjusted[out.token])) < 1e-6


def prompt_logprobs(client, engine):
    entry = post(client, {"prompt": "a b", "max_tokens": 1, "prompt_logprobs": 0})["choices"][0]["prompt_logprobs"]
    assert entry[0] is None and set(entry[1]["1"]) == {"logprob", "rank", "decoded_token"}
    error(client, {"prompt": "a", "prompt_logprobs": 21})
    error(client, {**CHAT, "stream": True, "prompt_logprobs": 1}, "/v1/chat/completions")


def logit_bias(client, engine):
    post(client, {"prompt": "a", "max_tokens": 1, "logit_bias": {"3": -100, "4": 100}})
    assert engine.submitted[-1].params.logit_bias == ((3, -100.0), (4, 100.0))
    assert "logit_bias" in error(client, {"prompt": "a", "logit_bias": {"3": -101}})


def min_tokens(client, engine):
    post(client, {"prompt": "a", "max_tokens": 3, "min_tokens": 2})
    assert engine.submitted[-1].params.min_tokens == 2
    assert "min_tokens" in error(client, {"prompt": "a", "max_tokens": 1, "min_tokens": 2})


def refused_openai_fields(client, engine):
    for field, value in (("best_of", 2), ("suffix", "x"), ("tools", [{"type": "function"}])):
        route = "/v1/chat/completions" if field == "tools" else "/v1/completions"
        body = {**CHAT, field: value} if field == "tools" else {"prompt": "a", field: value}
        assert field.rstrip("s") in error(client, body, route)
    post(client, {"prompt": "a", "max_tokens": 1, "best_of": 2, "n": 2})


def other_vllm_fields(client, engine):
    for field in ("repetition_penalty", "stop_token_ids", "guided_json"):
        assert field in error(client, {"prompt": "a", field: 1})


def models(client, engine):
    data = client.get("/v1/models").json()["data"]
    assert all("root" in m for m in data) and [m["id"] for m in data] == [BASE, *engine.adapters]


def tokenize(client, engine):
    body = post(client, {"prompt": "a b"}, "/tokenize")
    assert "token_strs" in body and body["token_strs"] is None
    assert post(client, {"prompt": "a b", "return_token_strs": True}, "/tokenize")["token_strs"] == ["w0", "w1"]


def unload(client, engine):
    response = client.post("/v1/unload_lora_adapter", json={"lora_name": ""}, headers=ADMIN_HEADERS)
    assert response.status_code == 400
    response = client.post("/v1/unload_lora_adapter", json={"lora_name": "nope"}, headers=ADMIN_HEADERS)
    assert response.status_code == 404


CHECKS = {"prompt forms": prompt_forms, "several prompts with `n`": prompts_with_n, "`echo`": echo,
          "`max_tokens: 0`": max_tokens_zero, "`logprobs` (completions)": completion_logprobs,
          "`top_logprobs` (chat)": chat_top_logprobs, "logprob values": logprob_values,
          "`prompt_logprobs`": prompt_logprobs, "`logit_bias`": logit_bias, "`min_tokens`": min_tokens,
          "`best_of`, `suffix`, `tools`": refused_openai_fields, "other vLLM sampling fields": other_vllm_fields,
          "`/v1/models`": models, "`/tokenize`": tokenize, "`/v1/unload_lora_adapter`": unload}


def test_the_table_and_the_checks_name_the_same_features():
    assert table_features() == list(CHECKS)


@pytest.mark.parametrize("feature", list(CHECKS))
def test_row(client, engine, feature):
    CHECKS[feature](client, engine)
