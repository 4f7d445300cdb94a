"""The real server over real HTTP: two adapters and the base give three different, PEFT-exact continuations."""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.conftest import TEST_CACHE
from tests.e2e.server_process import running_server
from tests.lora.peft_fixtures import peft_reference
from tests.peft_adapters import save_adapter

pytestmark = pytest.mark.slow

PROMPT = "The three most useful things to pack for a hike are"
TOKENS = 12


def peft_greedy(model, tokenizer) -> str:
    ids = torch.tensor([tokenizer(PROMPT, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new)


@pytest.fixture(scope="module")
def store(tmp_path_factory, default_base):
    folder = tmp_path_factory.mktemp("store")
    save_adapter(default_base.model, folder / "alpha", 1, scale_b=0.3, r=8, lora_alpha=16, target_modules="all-linear")
    save_adapter(default_base.model, folder / "beta", 2, scale_b=0.3, r=16, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    return folder


def complete(url: str, model: str) -> dict:
    response = httpx.post(f"{url}/v1/completions", timeout=120,
                          json={"model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.full
def test_two_adapters_and_base_over_http(store, default_base):
    tok = default_base.tokenizer
    expected = {"alpha": peft_greedy(peft_reference(default_base.model, store / "alpha"), tok),
                "beta": peft_greedy(peft_reference(default_base.model, store / "beta"), tok),
                default_base.name: peft_greedy(default_base.model, tok)}
    assert len(set(expected.values())) == 3, expected
    with running_server("--adapters-dir", str(store), "--cache-dir", str(TEST_CACHE), "--device", "cpu") as url:
        models = httpx.get(f"{url}/v1/models").json()["data"]
        assert {m["id"] for m in models} == set(expected)
        for model, text in expected.items():
            body = complete(url, model)
            assert body["object"] == "text_completion" and body["model"] == model
            assert body["choices"][0]["text"] == text, model
            assert body["usage"]["completion_tokens"] >= 1
        missing = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": PROMPT})
        assert missing.status_code == 404
        error = missing.json()["error"]
        assert "nope" in error["message"] and error["code"] == "model_not_found"
