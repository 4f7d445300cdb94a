"""The engine's front: validates a request, resolves its model, tokenizes it off the event loop,
and hands the core the sequences of its `n` choices.

Cheap checks (engine state, model, queue room, prompt length in characters) run first on the
event loop; the chat template and the tokenizer then run ONCE per request off the loop, in one
of two lanes, each a one-thread pool with its own tokenizer (a fast tokenizer is not safe to
call from two threads at once): prompts up to `LONG_PROMPT_CHARS` characters in one, longer
ones in the other at a lower CPU priority. A huge prompt (or a stream of them) thus never
blocks the loop, and short requests never queue behind it for the tokenizer or the CPU.
"""

from __future__ import annotations

import asyncio
import copy
from concurrent.futures import ThreadPoolExecutor

from server.engine.adapters import AdapterManager
from server.engine.contract import with_contract
from server.engine.core import EngineCore
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.grammar import GrammarCompiler
from server.engine.request import (
    EngineNotReadyError,
    GenerationRequest,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    ShuttingDownError,
    TokenLogprob,
)
from server.engine.sampler import SamplingOptions, make_generator
from server.engine.sequence import Sequence
from server.engine.stream import RequestStream
from server.threads import low_priority_pool

CHARS_PER_TOKEN_BOUND = 32   # no tokenizer makes a token of more characters than this
LONG_PROMPT_CHARS = 16_384   # longer prompts tokenize in the low-priority lane
_MAX_SEED = 2**63 - 1


class EngineFront:
    def __init__(self, *, core: EngineCore, manager: AdapterManager, tokenizer, max_queue: int, max_context: int,
                 kv_capacity: int, long_prompt_niceness: int = 10, grammars: GrammarCompiler | None = None,
                 vocab_size: int | None = None) -> None:
        self.core = core
        # Token ids a request may name (prompt ids, logit_bias keys): the tokenizer's and the logits' alike.
        self.vocab_size = min(len(tokenizer), vocab_size or len(tokenizer))
        self.grammars = grammars
        self.manager = manager
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.max_context = max_context
        self.kv_capacity = kv_capacity   # tokens the whole KV cache holds
        self.shutting_down = False
        self._short_lane = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-tokenize"), tokenizer)
        self._long_lane = (low_priority_pool(1, "loraplex-tokenize-long", long_prompt_niceness),
                           copy.deepcopy(tokenizer))
        self._tokenizing = 0

    def close(self) -> None:
        for pool, _ in (self._short_lane, self._long_lane):
            pool.shutdown(wait=False, cancel_futures=True)

    @property
    def num_tokenizing(self) -> int:
        return self._tokenizing

    async def submit(self, request: GenerationRequest) -> list[RequestStream]:
        """Validate and enqueue; returns one stream per choice. Raises EngineError subclasses."""
        (record, prefix), chars = self._check(request)
        request = with_contract(request, None if record is None else record.contract)
        fmt = request.params.response_format
        if fmt is not None and (request.params.ignore_eos or self.grammars is None):
            raise InvalidRequestError("response_format cannot be combined with ignore_eos" if self.grammars
                                      else "structured output is not available on this engine")
        if fmt is not None and request.params.min_tokens:
            raise InvalidRequestError("response_format cannot be combined with min_tokens (the grammar decides "
                                      "where the output ends)")
        pool, tokenizer = self._long_lane if chars > LONG_PROMPT_CHARS else self._short_lane
        self._tokenizing += 1
        try:
            prompt_ids, grammar, echo = await asyncio.get_running_loop().run_in_executor(
                pool, self._prepare, tokenizer, request)
        finally:
            self._tokenizing -= 1
        self._check_length(len(prompt_ids), request.params.max_tokens)
        if self.shutting_down:
            raise ShuttingDownError("the server is shutting down")
        seqs = [self._sequence(request, j, prompt_ids, record, prefix) for j in range(request.n)]
        for seq in seqs:
            seq.echo_text = echo
        if grammar is not None and self.grammars is not None:
            for seq in seqs:
                seq.constraint = self.grammars.constraint(grammar)
        if record is not None:
            record.requests += request.n
        first, *rest = seqs
        first.children = rest
        self.core.add([first])
        return [s.stream for s in seqs]

    def _prepare(self, tokenizer, request: GenerationRequest):
        """Token ids, the compiled grammar (None for free text) and the text to echo (None unless asked
        for: the prompt as given, or the decoded ids); runs on a tokenizer lane's thread."""
        fmt = request.params.response_format
        grammar = None if fmt is None or self.grammars is None else self.grammars.compile(fmt)
        ids = tokenize(tokenizer, request)
        echo = None
        if request.params.echo:
            echo = request.prompt if request.prompt is not None else tokenizer.decode(ids)
        return ids, grammar, echo

    async def tokenize(self, model: str, prompt: str | None, messages: tuple[dict, ...] | None,
                       add_special_tokens: bool, add_generation_prompt: bool, apply_template: bool) -> list[int]:
        """What `submit` would feed the model for these inputs (the contract's template when asked)."""
        if not self.core.running:
            raise EngineNotReadyError("the engine is not running yet")
        if (prompt is None) == (messages is None):
            raise InvalidRequestError("give exactly one of prompt and messages")
        record, _ = self.manager.resolve(model)
        request = GenerationRequest("tokenize", model, prompt=prompt, messages=messages,
                                    add_special_tokens=add_special_tokens, apply_template=apply_template)
        request = with_contract(request, None if record is None else record.contract)
        chars = len(request.prompt or "") + sum(len(str(m.get("content") or "")) for m in request.messages or ())
        pool, tokenizer = self._long_lane if chars > LONG_PROMPT_CHARS else self._short_lane
        return await asyncio.get_running_loop().run_in_executor(pool, tokenize, tokenizer, request,
                                                                add_generation_prompt)

    async def detokenize(self, model: str, tokens: list[int], as_strings: bool = False) -> str | list[str]:
        """The text of token ids (or each token's string); the model must exist."""
        if not self.core.running:
            raise EngineNotReadyError("the engine is not running yet")
        self.manager.resolve(model)
        vocab = len(self.tokenizer)
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary (0 to {vocab - 1})")
        pool, tokenizer = self._short_lane
        decode = tokenizer.convert_ids_to_tokens if as_strings else tokenizer.decode
        return await asyncio.get_running_loop().run_in_executor(pool, decode, tokens)

    # Checks -----------------------------------------------------------------------------------

    def _check(self, request: GenerationRequest):
        if self.shutting_down:
            raise ShuttingDownError("the server is shutting down and admits no new requests")
        if not self.core.running:
            raise EngineNotReadyError("the engine is not running yet")
        if not isinstance(request.n, int) or request.n < 1:
            raise InvalidRequestError(f"n must be a positive integer, got {request.n!r}")
        if sum(x is not None for x in (request.prompt, request.prompt_ids, request.messages)) != 1:
            raise InvalidRequestError("give exactly one of prompt, prompt_ids and messages")
        self._check_token_ids(request)
        resolved = self.manager.resolve(request.model)
        if self.core.num_waiting() + self._tokenizing + request.n > self.max_queue:
            raise QueueFullError(f"the queue is full ({self.max_queue} waiting sequences); retry later")
        chars = len(request.prompt) if request.prompt is not None else \
            sum(len(str(m.get("content") or "")) for m in request.messages or ())
        limit = CHARS_PER_TOKEN_BOUND * self._token_limit()
        if chars > limit:
            raise PromptTooLongError(f"the prompt has {chars} characters, more than {limit} can fit in "
                                     f"{self._token_limit()} tokens")
        return resolved, chars

    def _check_token_ids(self, request: GenerationRequest) -> None:
        """Prompt ids and logit_bias keys must name tokens of the vocabulary."""
        for ids, what in ((request.prompt_ids or (), "prompt"), ((t for t, _ in request.params.logit_bias),
                                                                 "logit_bias")):
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise InvalidRequestError(f"{what}: token id {bad} is outside the vocabulary (0 to "
                                          f"{self.vocab_size - 1})")

    def _token_limit(self) -> int:
        return min(self.max_context, self.kv_capacity)

    def _check_length(self, prompt_len: int, max_tokens: int) -> None:
        if not prompt_len:
            raise PromptTooLongError("the prompt is empty")
        total = prompt_len + max_tokens
        if total > self.max_context:
            raise PromptTooLongError(f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds "
                                     f"the model's context of {self.max_context} tokens")
        if total > self.kv_capacity:
            raise PromptTooLongError(f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds "
                                     f"the KV cache capacity of {self.kv_capacity} tokens, so it could never run")

    # Sequences --------------------------------------------------------------------------------

    def _sequence(self, request: GenerationRequest, j: int, prompt_ids: list[int], record, prefix) -> Sequence:
        params = request.params
        seed = choice_seed(params.seed, j)
        key = request.request_id if j == 0 else f"{request.request_id}#{j}"
        options = SamplingOptions(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                  presence_penalty=params.presence_penalty,
                                  frequency_penalty=params.frequency_penalty, logprobs=params.logprobs, seed=seed,
                                  logit_bias=params.logit_bias)
        return Sequence(request_id=request.request_id, key=key, prompt_len=len(prompt_ids),
                        token_ids=list(prompt_ids), params=params, options=options, generator=make_generator(seed),
                        detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop),
                        stream=RequestStream(request.request_id, self.core.abort, index=j, abort_key=key),
                        record=record, sha_prefix=prefix,
                        adapter=None if record is None else self.manager.cached(record),
                        prompt_logprobs=self._prompt_logprobs(params, prompt_ids))

    def _prompt_logprobs(self, params, prompt_ids: list[int]) -> list[TokenLogprob | None] | None:
        if params.prompt_logprobs is None:
            return None
        first = TokenLogprob(self.tokenizer.decode(prompt_ids[:1]), None, token_id=prompt_ids[0])
        return [first] + [None] * (len(prompt_ids) - 1)


def tokenize(tokenizer, request: GenerationRequest, add_generation_prompt: bool = True) -> list[int]:
    """The prompt's token ids (the chat template rendered first); runs on a tokenizer lane's thread."""
    if request.prompt_ids is not None:
        return list(request.prompt_ids)
    if request.messages is None:
        return tokenizer(request.prompt, add_special_tokens=request.add_special_tokens)["input_ids"]
    try:
        text = tokenizer.apply_chat_template(list(request.messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja errors from the model's own template (raise_exception, bad roles)
        raise InvalidRequestError(f"the chat template refused the messages: {exc}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def choice_seed(seed: int | None, j: int) -> int | None:
    """Choice j's seed: seed + j, or seed - j where seed + j would pass 2**63 - 1."""
    if seed is None:
        return None
    return seed + j if seed + j <= _MAX_SEED else seed - j
