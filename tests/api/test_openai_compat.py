"""vLLM's and OpenAI's completions details over real HTTP with the official `openai` client, every number
checked against transformers + PEFT computed in this process (float32): prompt forms, echo, prompt
logprobs, logprobs semantics, logit_bias, min_tokens, and the models / tokenize / unload details."""

from __future__ import annotations

import httpx
import pytest
import torch
from openai import BadRequestError, OpenAI

from tests.api.real_fixtures import ADAPTERS, ADMIN, BASE_NAME, fresh_base, save_adapter
from tests.conftest import TEST_CACHE
from tests.e2e.server_process import running_server
from tests.peft_adapters import peft_reference

pytestmark = [pytest.mark.slow, pytest.mark.full]  # a real server and a PEFT reference: about 3 minutes

TOL = 1e-4
PROMPTS = ["The three most useful things to pack for a hike are", "Cats and dogs"]
MESSAGES = [{"role": "user", "content": "Name a good name for a cat."}]
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}


class Reference:
    """transformers (+ PEFT) in this process: the log-softmax of every position of a token sequence."""

    def __init__(self, store) -> None:
        base = fresh_base()
        self.tokenizer = base.tokenizer
        self.models = {BASE_NAME: base.model, "alpha": peft_reference(base.model, store / "alpha")}

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    @torch.inference_mode()
    def logprobs(self, model: str, ids: list[int]) -> torch.Tensor:
        """[len(ids), vocab]: row i is the distribution of the token after ids[:i + 1]."""
        logits = self.models[model](input_ids=torch.tensor([ids])).logits[0]
        return logits.float().log_softmax(dim=-1)

    def greedy(self, model: str, ids: list[int], steps: int) -> list[int]:
        ids = list(ids)
        for _ in range(steps):
            ids.append(int(self.logprobs(model, ids)[-1].argmax()))
        return ids


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    store = tmp_path_factory.mktemp("compat") / "store"
    base = fresh_base()
    for name in ("alpha", "beta"):
        seed, lora = ADAPTERS[name]
        save_adapter(base.model, store / name, seed, **lora)
    del base
    flags = ["--adapters-dir", str(store), "--cache-dir", str(TEST_CACHE), "--device", "cpu"]
    with running_server(*flags, env={"LORAPLEX_ADMIN_TOKEN": ADMIN}, timeout=600) as url:
        yield url, store, Reference(store)


@pytest.fixture(scope="module")
def client(world):
    return OpenAI(base_url=f"{world[0]}/v1", api_key="unused")


@pytest.fixture(scope="module")
def ref(world) -> Reference:
    return world[2]


def close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL


# Prompt forms ---------------------------------------------------------------------------------------------

def test_every_prompt_form_gives_the_same_choices(client, ref):
    ids = [ref.ids(p) for p in PROMPTS]
    forms = {"strings": PROMPTS, "id lists": ids}
    outs = {k: client.completions.create(model="alpha", prompt=v, n=2, max_tokens=4, temperature=0)
            for k, v in forms.items()}
    for out in outs.values():
        assert [c.index for c in out.choices] == [0, 1, 2, 3]  # prompt p, choice j: index p * n + j
        assert out.usage.prompt_tokens == sum(len(i) for i in ids)  # each prompt once, whatever n is
        assert out.usage.completion_tokens == 2 * 2 * 4
    texts = [c.text for c in outs["strings"].choices]
    assert texts == [c.text for c in outs["id lists"].choices]
    for p, prompt_ids in enumerate(ids):
        expected = ref.tokenizer.decode(ref.greedy("alpha", prompt_ids, 4)[len(prompt_ids):])
        assert texts[2 * p] == texts[2 * p + 1] == expected
    single = client.completions.create(model="alpha", prompt=ids[0], max_tokens=4, temperature=0)
    assert single.choices[0].text == texts[0]
    string = client.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=4, temperature=0)
    assert string.choices[0].text == texts[2]


@pytest.mark.parametrize("prompt, bad", [([5, 10**6], 10**6), ([[1, 2], [3, -1]], -1)])
def test_token_ids_outside_the_vocabulary_are_400_naming_the_id(client, prompt, bad):
    with pytest.raises(BadRequestError) as caught:
        client.completions.create(model="alpha", prompt=prompt, max_tokens=2)
    assert str(bad) in caught.value.message


# Echo and prompt logprobs ------------------------------------------------------------------------------

def test_echo_with_logprobs_scores_every_prompt_of_a_batch(client, ref):
    ids = [ref.ids(p) for p in PROMPTS]
    out = client.completions.create(model="alpha", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    assert out.usage.completion_tokens == 0
    for choice, prompt_ids in zip(out.choices, ids):
        assert choice.text == ref.tokenizer.decode(prompt_ids) and choice.finish_reason == "length"
        lp = choice.logprobs
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.tokens == [ref.tokenizer.decode([t]) for t in prompt_ids]
        expected = ref.logprobs("alpha", prompt_ids)
        for i in range(1, len(prompt_ids)):
            assert close(lp.token_logprobs[i], float(expected[i - 1, prompt_ids[i]]))
            top = int(expected[i - 1].argmax())
            alternatives = lp.top_logprobs[i]  # the top 1 plus the prompt token itself
            assert set(alternatives) == {ref.tokenizer.decode([top]), lp.tokens[i]}
            assert close(alternatives[ref.tokenizer.decode([top])], float(expected[i - 1, top]))


def test_echo_with_generation_puts_the_prompt_first(client, ref):
    prompt_ids = ref.ids(PROMPTS[0])
    out = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=3, echo=True, logprobs=0,
                                    temperature=0)
    generated = ref.greedy("alpha", prompt_ids, 3)[len(prompt_ids):]
    choice = out.choices[0]
    assert choice.text == PROMPTS[0] + ref.tokenizer.decode(generated)
    assert len(choice.logprobs.tokens) == len(prompt_ids) + 3
    assert choice.logprobs.text_offset[len(prompt_ids)] == len(PROMPTS[0])
    streamed = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=3, echo=True, stream=True,
                                         temperature=0)
    assert "".join(c.choices[0].text for c in streamed) == choice.text


def test_prompt_logprobs_as_vllm_sends_them(client, ref):
    prompt_ids = ref.ids(PROMPTS[0])
    out = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=1, temperature=0,
                                    extra_body={"prompt_logprobs": 2})
    entries = out.choices[0].model_extra["prompt_logprobs"]
    expected = ref.logprobs("alpha", prompt_ids)
    assert entries[0] is None and len(entries) == len(prompt_ids)
    for i in range(1, len(prompt_ids)):
        row = expected[i - 1]
        token = str(prompt_ids[i])
        assert close(entries[i][token]["logprob"], float(row[prompt_ids[i]]))
        assert entries[i][token]["rank"] == int((row > row[prompt_ids[i]]).sum()) + 1
        assert entries[i][token]["decoded_token"] == ref.tokenizer.decode([prompt_ids[i]])
        top2 = row.topk(2).indices.tolist()
        assert set(entries[i]) == {token, *map(str, top2)}
        assert [entries[i][str(t)]["rank"] for t in top2] == [1, 2]


def test_prompt_logprobs_are_the_same_over_a_cached_prefix(client, ref):
    """The prefix cache is skipped for requests that want prompt logprobs: a cached prefix has no logits."""
    prompt = PROMPTS[0] * 3  # several KV blocks long
    plain = client.completions.create(model="alpha", prompt=prompt, max_tokens=1)  # fills the prefix cache
    assert plain.choices
    scores = [client.completions.create(model="alpha", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
              .choices[0].logprobs.token_logprobs for _ in range(2)]
    expected = ref.logprobs("alpha", ref.ids(prompt))
    ids = ref.ids(prompt)
    for got in scores:
        assert got[0] is None
        assert all(close(got[i], float(expected[i - 1, ids[i]])) for i in range(1, len(ids)))


def test_chat_prompt_logprobs_over_the_rendered_template(world, client, ref):
    url = world[0]
    ids = httpx.post(f"{url}/tokenize", json={"model": "alpha", "messages": MESSAGES}).json()["tokens"]
    out = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=0,
                                         extra_body={"prompt_logprobs": 0})
    entries = out.model_extra["prompt_logprobs"]
    expected = ref.logprobs("alpha", ids)
    assert entries[0] is None and len(entries) == len(ids)
    assert all(close(entries[i][str(ids[i])]["logprob"], float(expected[i - 1, ids[i]])) for i in range(1, len(ids)))


# Logprobs semantics, logit_bias, min_tokens ----------------------------------------------------------

def test_logprobs_zero_is_the_sampled_token_alone(client, ref):
    prompt_ids = ref.ids(PROMPTS[0])
    out = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=3, logprobs=0, temperature=0)
    lp = out.choices[0].logprobs
    ids = ref.greedy("alpha", prompt_ids, 3)
    expected = ref.logprobs("alpha", ids)
    for i, top in enumerate(lp.top_logprobs):
        position = len(prompt_ids) - 1 + i
        assert top == {lp.tokens[i]: lp.token_logprobs[i]}
        assert close(lp.token_logprobs[i], float(expected[position, ids[position + 1]]))


def test_sampled_token_is_always_among_the_alternatives(client):
    out = client.completions.create(model=BASE_NAME, prompt=PROMPTS[1], max_tokens=8, logprobs=1, temperature=2,
                                    seed=3)
    lp = out.choices[0].logprobs
    assert all(token in top for token, top in zip(lp.tokens, lp.top_logprobs))
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)


def test_chat_top_logprobs_match_peft(client, world, ref):
    ids = httpx.post(f"{world[0]}/tokenize", json={"model": "alpha", "messages": MESSAGES}).json()["tokens"]
    out = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=2, temperature=0,
                                         logprobs=True, top_logprobs=3)
    row = ref.logprobs("alpha", ids)[-1]
    first = out.choices[0].logprobs.content[0]
    assert close(first.logprob, float(row.max()))
    assert [t.token for t in first.top_logprobs] == [ref.tokenizer.decode([t]) for t in row.topk(3).indices]
    assert all(close(t.logprob, float(v)) for t, v in zip(first.top_logprobs, row.topk(3).values))


def test_logit_bias_steers_greedy_choice(client, ref):
    prompt_ids = ref.ids(PROMPTS[0])
    row = ref.logprobs("alpha", prompt_ids)[-1]
    best, second = row.topk(2).indices.tolist()
    banned = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=1, temperature=0,
                                       logit_bias={str(best): -100})
    assert banned.choices[0].text == ref.tokenizer.decode([second])
    word = ref.ids(" river")[0]
    forced = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=3, temperature=0,
                                       logit_bias={str(word): 100})
    assert forced.choices[0].text == ref.tokenizer.decode([word] * 3)
    with pytest.raises(BadRequestError) as caught:
        client.completions.create(model="alpha", prompt="x", max_tokens=1, logit_bias={"999999": 1})
    assert "999999" in caught.value.message


def test_min_tokens_holds_back_end_of_sequence(client, ref):
    eos = str(ref.tokenizer.eos_token_id)
    quick = client.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=8, logit_bias={eos: 100})
    assert quick.choices[0].finish_reason == "stop" and quick.usage.completion_tokens == 1
    held = client.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=8, logit_bias={eos: 100},
                                     extra_body={"min_tokens": 3})
    assert held.choices[0].finish_reason == "stop" and held.usage.completion_tokens == 4


# Models, tokenize, unload ---------------------------------------------------------------------------

def test_models_have_root_and_load_order(world):
    url, store, _ = world
    data = httpx.get(f"{url}/v1/models").json()["data"]
    assert [m["id"] for m in data] == [BASE_NAME, "alpha", "beta"]
    assert data[0]["root"] and all(m["root"] == str(store / m["id"]) for m in data[1:])
    admin = httpx.Client(base_url=url, headers=ADMIN_HEADERS)
    assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "alpha"}).status_code == 200
    assert admin.post("/v1/load_lora_adapter", json={"lora_name": "alpha",
                                                      "lora_path": str(store / "alpha")}).status_code == 200
    assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == [BASE_NAME, "beta", "alpha"]


def test_tokenize_sends_null_token_strs_and_unload_checks_its_name(world):
    url = world[0]
    body = httpx.post(f"{url}/tokenize", json={"model": BASE_NAME, "prompt": "hi"}).json()
    assert "token_strs" in body and body["token_strs"] is None
    empty = httpx.post(f"{url}/v1/unload_lora_adapter", headers=ADMIN_HEADERS, json={"lora_name": ""})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "lora_name"
