"""A torch-free engine that follows the engine contract, for fast tests of the HTTP layer.

Its "tokens" are predictable words, so every response can be checked exactly: choice
text is `" <model>.<seed>.<i>"` for i in range(max_tokens).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, replace

from server.engine.request import (AdapterExistsError, AdapterInfo, AdapterRejectedError, Delta, EngineNotReadyError,
                                   GenerationRequest, PromptTooLongError, QueueFullError, TokenLogprob,
                                   UnknownModelError)
from server.engine.stream import RequestStream

BASE = "base-model"


@dataclass(frozen=True)
class Card:
    id: str
    created: int
    parent: str | None


@dataclass
class Stats:
    waiting: int = 0
    running: int = 0
    kv_blocks_used: int = 3
    kv_blocks_total: int = 12
    adapters_on_device: int = 1
    adapters_on_cpu: int = 2


def fake_tokens(model: str, seed: int | None, count: int) -> list[str]:
    return [f" {model}.{seed}.{i}" for i in range(count)]


class FakeEngine:
    base_name = BASE

    def __init__(self, delay: float = 0.0, context: int = 64, adapters: tuple[str, ...] = ("alpha", "beta")) -> None:
        self.delay, self.context = delay, context
        self.ready = True
        self.queue_full = False
        self.adapters: dict[str, AdapterInfo] = {}
        self.blobs: dict[str, tuple[bytes, bytes]] = {}
        self.submitted: list[GenerationRequest] = []
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.running: set[str] = set()
        for name in adapters:
            self.add_adapter(name, json.dumps({"r": 4, "lora_alpha": 8}).encode(), b"weights")

    # inference
    def models(self) -> list[Card]:
        return [Card(BASE, 0, None)] + [Card(a.name, a.created, BASE) for a in self.adapters.values()]

    def max_context(self) -> int:
        return self.context

    def chat_prompt(self, messages: list[dict]) -> str:
        if messages[-1]["role"] == "assistant" and messages[-1]["content"] == "boom":
            raise ValueError("template refuses 'boom'")
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def submit(self, request: GenerationRequest) -> RequestStream:
        if not self.ready:
            raise EngineNotReadyError("the engine is still loading")
        if request.model != BASE and request.model not in self.adapters:
            raise UnknownModelError(f"The model '{request.model}' does not exist")
        prompt_tokens = len(request.prompt.split())
        if prompt_tokens + request.params.max_tokens > self.context:
            raise PromptTooLongError(f"prompt ({prompt_tokens} tokens) plus max_tokens "
                                     f"({request.params.max_tokens}) exceeds the context of {self.context} tokens")
        if self.queue_full:
            raise QueueFullError("the queue is full, retry later")
        self.submitted.append(request)
        stream = RequestStream(request.request_id, self._abort)
        self.running.add(request.request_id)
        asyncio.get_running_loop().create_task(self._produce(request, stream, prompt_tokens))
        return stream

    def _abort(self, request_id: str) -> None:
        if request_id in self.running:
            self.running.discard(request_id)
            self.aborted.append(request_id)

    async def _produce(self, request: GenerationRequest, stream: RequestStream, prompt_tokens: int) -> None:
        params = request.params
        tokens = fake_tokens(request.model, params.seed, params.max_tokens)
        for i, token in enumerate(tokens):
            if self.delay:
                await asyncio.sleep(self.delay)
            if request.request_id not in self.running:
                return
            logprobs = ()
            if params.logprobs is not None:
                top = tuple((f" alt{k}", -1.0 - k) for k in range(params.logprobs))
                logprobs = (TokenLogprob(token, -0.5, top),)
            last = i == len(tokens) - 1
            stream.put(Delta(token, logprobs, "length" if last else None, prompt_tokens, i + 1))
        self.running.discard(request.request_id)
        self.finished.append(request.request_id)

    # adapter admin
    def add_adapter(self, name: str, config_bytes: bytes, weights_bytes: bytes, overwrite: bool = False) -> AdapterInfo:
        try:
            config = json.loads(config_bytes)
        except ValueError as exc:
            raise AdapterRejectedError(f"adapter_config.json is not valid JSON: {exc}") from exc
        if config.get("r", 0) > 16:
            raise AdapterRejectedError(f"rank {config['r']} is above --max-lora-rank 16")
        old = self.adapters.get(name)
        if old is not None and not overwrite:
            raise AdapterExistsError(f"adapter '{name}' exists; send overwrite=true to replace it")
        info = AdapterInfo(name=name, version=old.version + 1 if old else 1, status="ready", error=None, tier="disk",
                           rank=config.get("r", 4), alpha=float(config.get("lora_alpha", 8)),
                           target_modules=("q_proj", "v_proj"), size_bytes=len(weights_bytes),
                           created=int(time.time()))
        self.adapters[name] = info
        self.blobs[name] = (config_bytes, weights_bytes)
        return info

    def delete_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise UnknownModelError(f"The adapter '{name}' does not exist")
        del self.adapters[name]
        del self.blobs[name]

    def adapter_info(self, name: str) -> AdapterInfo:
        if name not in self.adapters:
            raise UnknownModelError(f"The adapter '{name}' does not exist")
        return replace(self.adapters[name], requests=sum(r.model == name for r in self.submitted))

    def list_adapters(self) -> list[AdapterInfo]:
        return [self.adapter_info(n) for n in self.adapters]

    def stats(self) -> Stats:
        return Stats(running=len(self.running))
