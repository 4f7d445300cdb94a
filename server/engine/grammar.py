"""Structured output: OpenAI's `response_format` compiled to a grammar, one matcher per sequence.

xgrammar (see docs/dependencies.md) compiles a JSON schema against the
tokenizer's vocabulary once per distinct schema (cached); each constrained sequence holds a
matcher that tracks what it has generated. Every step the core asks `fill_masks` for the
allowed-token masks of all of the step's constrained sequences in one call (xgrammar fills
the rows in parallel), and the sampler applies them in its vectorised pass.

xgrammar accepts some JSON-schema keywords it does not enforce, so schemas are checked
against the keywords it does enforce first: anything else is refused (400) rather than
generating output that might not validate.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch
import xgrammar
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from server.engine.request import InvalidRequestError, OutputFormat

# Keywords xgrammar enforces while generating; annotations (no effect on validity) are allowed too.
ENFORCED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "$ref", "$defs", "definitions", "minLength", "maxLength", "pattern",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
})
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment",
                         "deprecated", "readOnly", "writeOnly"})
SCHEMA_MAPS = ("properties", "$defs", "definitions")     # keyword -> {name: schema}
SCHEMA_LISTS = ("anyOf", "prefixItems")                  # keyword -> [schema]
SCHEMA_VALUES = ("items", "additionalProperties")        # keyword -> schema (or a bool)
MAX_SCHEMA_BYTES = 64 * 1024
MAX_ITEMS = 1024   # minItems / maxItems / prefixItems: compile time grows with them (100,000: seconds)
CACHE_SIZE = 64


def check_schema(schema: object) -> None:
    """Raise InvalidRequestError naming the first keyword this server cannot enforce, or an invalid schema."""
    if not isinstance(schema, dict):
        raise InvalidRequestError("response_format.json_schema.schema must be a JSON object")
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise InvalidRequestError(f"the JSON schema is larger than {MAX_SCHEMA_BYTES} bytes")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise InvalidRequestError(f"invalid JSON schema: {exc.message}") from None
    _check_keywords(schema, "schema")


def _check_keywords(schema: object, where: str) -> None:
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{where} must be a JSON schema object")
    for key, value in schema.items():
        if key not in ENFORCED and key not in ANNOTATIONS:
            raise InvalidRequestError(f"JSON schema keyword '{key}' (at {where}) is not supported for structured "
                                      f"output; supported: {', '.join(sorted(ENFORCED))}")
        if key in ("minItems", "maxItems") and isinstance(value, int) and value > MAX_ITEMS \
                or key == "prefixItems" and isinstance(value, list) and len(value) > MAX_ITEMS:
            raise InvalidRequestError(f"{key} at {where} is above this server's limit of {MAX_ITEMS} items")
        if key in SCHEMA_MAPS:
            for name, sub in value.items():
                _check_keywords(sub, f"{where}.{key}.{name}")
        elif key in SCHEMA_LISTS:
            for i, sub in enumerate(value):
                _check_keywords(sub, f"{where}.{key}[{i}]")
        elif key in SCHEMA_VALUES:
            _check_keywords(value, f"{where}.{key}")
        elif key == "$ref" and not str(value).startswith("#"):
            raise InvalidRequestError(f"only local $ref (#/...) is supported, not {value!r} (at {where})")


class Constraint:
    """One sequence's grammar state: which tokens may come next, and whether it is complete."""

    def __init__(self, matcher: xgrammar.GrammarMatcher) -> None:
        self.matcher = matcher

    def accept(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()


class GrammarCompiler:
    """Compiles output formats for one tokenizer; thread-safe (tokenizer lanes call it), results cached."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: Sequence[int]) -> None:
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._cache: OrderedDict[str, xgrammar.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.batch = xgrammar.BatchGrammarMatcher()

    def constraint(self, compiled: xgrammar.CompiledGrammar) -> Constraint:
        """A fresh matcher (cheap) for one sequence; EOS is the only token allowed once the grammar completes."""
        return Constraint(xgrammar.GrammarMatcher(compiled, override_stop_tokens=self.stop_ids))

    def compile(self, fmt: OutputFormat) -> xgrammar.CompiledGrammar:
        key = fmt.kind + "\0" + (fmt.schema_json or "")
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            compiler = self._compiler_locked()
        if fmt.kind == "json_object":
            compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        else:
            schema = fmt.schema_json or "null"
            check_schema(json.loads(schema))  # refuses a missing schema
            try:
                compiled = compiler.compile_json_schema(schema, any_whitespace=False)
            except Exception as exc:  # noqa: BLE001 - xgrammar's C++ errors arrive as several types
                message = str(exc).strip().splitlines()[-1].split(": ", 1)[-1] if str(exc).strip() else type(exc)
                raise InvalidRequestError(f"the JSON schema cannot be used for structured output: {message}") from None
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compiler_locked(self) -> xgrammar.GrammarCompiler:
        if self._compiler is None:
            info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                           stop_token_ids=self.stop_ids)
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        return self._compiler

    def fill_masks(self, constraints: Sequence[Constraint]) -> torch.Tensor:
        """Allowed next tokens of every constraint, one call for the batch: bool [len(constraints), vocab]."""
        bitmask = xgrammar.allocate_token_bitmask(len(constraints), self.vocab_size)
        self.batch.batch_fill_next_token_bitmask([c.matcher for c in constraints], bitmask)
        return unpack_bitmask(bitmask, self.vocab_size)


_SHIFTS = torch.arange(32, dtype=torch.int32)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [R, ceil(V/32)] (bit j of word w = token 32w + j) -> bool [R, V], with no loop over the vocabulary."""
    bits = (bitmask.unsqueeze(-1) >> _SHIFTS) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()
