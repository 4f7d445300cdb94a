"""Structured output in the engine: schema checks, bitmask unpacking, masks in the vectorised sampler."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from server.engine.grammar import GrammarCompiler, check_schema, unpack_bitmask
from server.engine.request import InvalidRequestError, OutputFormat
from server.engine.sampler import Sampler, SamplingOptions, make_generator


def test_unpack_bitmask_matches_the_bit_layout():
    vocab = 70
    allowed = torch.rand(3, vocab) < 0.5
    words = torch.zeros(3, 3, dtype=torch.int64)
    for r in range(3):
        for t in range(vocab):
            if allowed[r, t]:
                words[r, t // 32] |= 1 << (t % 32)
    bitmask = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # two's complement
    assert torch.equal(unpack_bitmask(bitmask, vocab), allowed)


def test_masked_rows_only_pick_allowed_tokens_and_free_rows_are_unchanged():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    options = [SamplingOptions(temperature=0.0), SamplingOptions(temperature=1.0, seed=1),
               SamplingOptions(temperature=0.0), SamplingOptions(temperature=1.0, seed=2, logprobs=2)]
    gens = [make_generator(o.seed) for o in options]
    free = Sampler().sample(logits, options, [make_generator(o.seed) for o in options])
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[0, [3, 7]] = True
    mask[1, [11]] = True
    outs = Sampler().sample(logits, options, gens, allowed=([1, 3], mask))
    assert outs[1].token in (3, 7) and outs[3].token == 11
    assert outs[3].logprob == pytest.approx(0.0)  # the only allowed token holds all the mass
    assert [outs[0].token, outs[2].token] == [free[0].token, free[2].token]


@pytest.mark.parametrize("schema, words", [
    ({"type": "object", "not": {}}, "'not'"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "email"}}}, "properties.a"),
    ({"type": "array", "items": {"uniqueItems": True}}, "'uniqueItems'"),
    ({"type": "nonsense"}, "invalid JSON schema"),
    ({"$ref": "other.json"}, "local $ref"),
    ({"type": "array", "minItems": 100_000}, "limit of 1024"),
])
def test_schemas_with_unenforced_keywords_are_refused(schema, words):
    with pytest.raises(InvalidRequestError) as info:
        check_schema(schema)
    assert words in str(info.value)


def test_a_compiled_schema_steers_a_matcher_to_completion(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tokenizer.eos_token_id
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [eos])
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    grammar = compiler.compile(OutputFormat("json_schema", json.dumps(schema)))
    assert compiler.compile(OutputFormat("json_schema", json.dumps(schema))) is grammar  # cached
    constraint = compiler.constraint(grammar)
    for token in tokenizer.encode('{"ok": true}', add_special_tokens=False):
        assert compiler.fill_masks([constraint])[0, token]
        assert constraint.accept(token)
    mask = compiler.fill_masks([constraint])[0]
    assert mask[eos] and int(mask.sum()) == 1  # complete: only end-of-sequence may follow
    assert constraint.accept(eos) and constraint.terminated
