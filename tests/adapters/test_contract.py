"""loraplex.json: validation with errors that name the field, templates, merge patches, identity."""

from __future__ import annotations

import json

import pytest

from server.adapters.contract import ContractError, parse_contract, patched
from server.adapters.identity import adapter_sha256
from server.train.contract import contract_from_records
from server.train.tasks import TASKS


def test_a_full_contract_round_trips():
    raw = {"description": "d", "prompt_template": "Q: {input}\nA:", "system_prompt": "Be brief.",
           "defaults": {"temperature": 0, "max_tokens": 8, "stop": ["\n"], "top_p": 0.5},
           "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"},
                                                                       "strict": True}},
           "examples": ["hello"]}
    contract = parse_contract(json.dumps(raw).encode())
    assert parse_contract(contract.to_bytes()) == contract
    assert contract.as_dict()["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert contract.render_prompt("a {b} c") == "Q: a {b} c\nA:"  # the input is inserted verbatim


@pytest.mark.parametrize("raw, words", [
    ({"promt_template": "x"}, "unknown key 'promt_template'"),
    ({"defaults": {"max_token": 3}}, "unknown key 'defaults.max_token'"),
    ({"prompt_template": "{input} and {input}"}, "exactly once"),
    ({"defaults": {"temperature": 3}}, "defaults.temperature"),
    ({"defaults": {"stop": ["a", "b", "c", "d", "e"]}}, "defaults.stop"),
    ({"response_format": {"type": "json_schema"}}, "needs a json_schema"),
    ({"response_format": {"type": "json_object", "json_schema": {"name": "x", "schema": {}}}}, "only allowed"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "extra": 1}}},
     "unknown key 'response_format.json_schema.extra'"),
])
def test_bad_contracts_name_the_problem(raw, words):
    with pytest.raises(ContractError, match="loraplex.json") as info:
        parse_contract(json.dumps(raw).encode())
    assert words in str(info.value)


def test_merge_patch_replaces_schemas_whole_and_null_removes():
    current = parse_contract(json.dumps({"prompt_template": "{input}", "defaults": {"max_tokens": 4, "stop": ["."]},
                                         "response_format": {"type": "json_schema", "json_schema": {
                                             "name": "a", "schema": {"type": "object", "required": ["x"]}}}}).encode())
    new = patched(current, {"defaults": {"max_tokens": 9}, "prompt_template": None,
                            "response_format": {"json_schema": {"schema": {"type": "array"}}}})
    assert new.prompt_template is None and new.defaults.max_tokens == 9 and new.defaults.stop == ["."]
    assert new.response_format.json_schema.schema_ == {"type": "array"}
    with pytest.raises(ContractError, match="unknown key 'defaults.nope'"):
        patched(current, {"defaults": {"nope": 1}})


def test_identity_covers_the_contract_and_keeps_old_identities():
    config, weights = b'{"r": 8}', b"weights"
    assert adapter_sha256(config, weights) == adapter_sha256(config, weights, None)
    with_contract = adapter_sha256(config, weights, b"{}")
    assert with_contract != adapter_sha256(config, weights) != adapter_sha256(config, weights, b'{"a": 1}')
    assert adapter_sha256(config, b"{}" + weights) != with_contract


def test_train_writes_the_task_template_from_its_data():
    records = TASKS["template"].examples(50, seed=3)
    contract = contract_from_records(records, completion_tokens=10, description="t")
    assert contract.prompt_template == "Input: {input}\nOutput:"
    assert contract.defaults.stop == ["\n"] and contract.defaults.max_tokens == 15
    assert contract.render_prompt(contract.examples[0]) == records[0]["prompt"]
    chat = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": u},
                          {"role": "assistant", "content": "ok\nfine"}]} for u in ("a", "b")]
    chat_contract = contract_from_records(chat, completion_tokens=2, description="c")
    assert chat_contract.system_prompt == "S" and chat_contract.prompt_template is None
    assert chat_contract.defaults.stop is None  # completions hold newlines
