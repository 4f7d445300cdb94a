"""A torch-free engine that follows the engine contract, for fast tests of the HTTP layer.

Its "tokens" are predictable words, so every response can be checked exactly: choice
text is `" <model>.<seed>.<i>"` for i in range(max_tokens). Like the real engine, it
renders chat messages itself and seeds choice j of a request with seed + j.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from server.engine.protocol import EngineStats, ModelCard
from server.engine.request import (
    AdapterExistsError,
    AdapterInfo,
    AdapterRejectedError,
    AdapterVersionMismatchError,
    Delta,
    EngineError,
    EngineNotReadyError,
    GenerationRequest,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
    ShuttingDownError,
    TokenLogprob,
    UnknownModelError,
)
from server.engine.stream import RequestStream

if TYPE_CHECKING:
    from server.engine.protocol import EngineAPI

INT64_MAX = 2**63 - 1
BIG_WEIGHTS = 4 << 20
VOCAB = 1000  # token ids a request may name; id i is the word "w<i>"
BASE = "base-model"
NO_STORE = Path("/nonexistent-fake-store")  # the fake keeps adapters in memory: no folder is its own


def identity(config: bytes, weights: bytes) -> str:
    return hashlib.sha256(b"loraplex-adapter-v1\0" + len(config).to_bytes(8, "little") + config + weights).hexdigest()


def choice_seed(seed: int | None, j: int) -> int | None:
    if seed is None:
        return None
    return seed + j if seed + j <= INT64_MAX else seed - j


def fake_tokens(model: str, seed: int | None, count: int) -> list[str]:
    return [f" {model}.{seed}.{i}" for i in range(count)]


def fake_prompt_logprobs(prompt: str, k: int | None) -> tuple[TokenLogprob, ...] | None:
    """Word i of the prompt (token id i) at logprob -0.25, rank 3, after alternatives alt0.. (ids 900..)."""
    if k is None:
        return None
    words = prompt.split()
    top = tuple((f"alt{j}", -0.1 - j / 100) for j in range(k))
    return (TokenLogprob(words[0], None, token_id=0),) + tuple(
        TokenLogprob(w, -0.25, top, token_id=i, rank=3, top_ids=tuple(900 + j for j in range(k)))
        for i, w in enumerate(words[1:], start=1))


class FakeEngine:
    base_name = BASE

    def __init__(self, delay: float = 0.0, context: int = 64, adapters: tuple[str, ...] = ("alpha", "beta")) -> None:
        self.delay, self.context = delay, context
        self.ready = True
        self.queue_full = False
        self.shutting_down = False
        self.stopped = False
        self.add_delay = 0.0
        self.generation = 0
        self.adapters: dict[str, AdapterInfo] = {}
        self.blobs: dict[str, tuple[bytes, bytes]] = {}
        self.submitted: list[GenerationRequest] = []
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.running: set[str] = set()
        self.weights_paths: list[Path] = []
        for name in adapters:
            self._register(name, json.dumps({"r": 4, "lora_alpha": 8}).encode(), b"weights", False)

    # inference
    def models(self) -> list[ModelCard]:
        return [ModelCard(BASE, 0, None)] + [ModelCard(a.name, a.created, BASE, a.sha256, a.version)
                                             for a in self.adapters.values()]

    def max_context(self) -> int:
        return self.context

    def render(self, messages: tuple[dict, ...]) -> str:
        if messages[-1]["role"] == "assistant" and messages[-1]["content"] == "boom":
            raise EngineError("the chat template cannot render these messages: template refuses 'boom'")
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def begin_shutdown(self) -> None:
        self.shutting_down = True

    def stop(self) -> None:
        self.stopped = True

    def num_active(self) -> int:
        return len(self.running)

    def _check_model(self, model: str) -> str:
        name, _, pin = model.partition("@")
        if name != BASE and name not in self.adapters:
            raise UnknownModelError(f"The model '{model}' does not exist")
        if pin and (name == BASE or not self.adapters[name].sha256.startswith(pin.lower())):
            raise AdapterVersionMismatchError(f"the current version of '{name}' is not {pin}")
        return name

    async def submit(self, request: GenerationRequest) -> list[RequestStream]:
        if self.shutting_down:
            raise ShuttingDownError("the server is shutting down")
        if not self.ready:
            raise EngineNotReadyError("the engine is still loading")
        model = self._check_model(request.model)
        ids = getattr(request, "prompt_ids", None)
        if sum(x is not None for x in (request.prompt, ids, request.messages)) != 1:
            raise EngineError("give exactly one of prompt, prompt_ids and messages")
        bad = next((t for t in ids or () if not 0 <= t < VOCAB), None)
        if bad is not None:
            raise EngineError(f"prompt: token id {bad} is outside the vocabulary (0 to {VOCAB - 1})")
        if ids is not None:
            prompt = " ".join(f"w{t}" for t in ids)
        else:
            prompt = self.render(request.messages) if request.messages is not None else request.prompt or ""
        prompt_tokens = len(prompt.split())
        if prompt_tokens + request.params.max_tokens > self.context:
            raise PromptTooLongError(f"prompt ({prompt_tokens} tokens) plus max_tokens "
                                     f"({request.params.max_tokens}) exceeds the context of {self.context} tokens")
        if self.queue_full:
            raise QueueFullError("the queue is full, retry later")
        self.submitted.append(request)
        streams = []
        for j in range(request.n):
            rid = request.request_id if request.n == 1 else f"{request.request_id}.{j}"
            params = replace(request.params, seed=choice_seed(request.params.seed, j))
            stream = RequestStream(rid, self._abort)
            self.running.add(rid)
            asyncio.get_running_loop().create_task(self._produce(rid, model, params, stream, prompt))
            streams.append(stream)
        return streams

    async def tokenize(self, model: str, prompt: str | None = None, messages: tuple[dict, ...] | None = None,
                       add_special_tokens: bool = True, add_generation_prompt: bool = True,
                       apply_template: bool = False) -> list[int]:
        """Word i of the text is token id i."""
        self._check_model(model)
        text = prompt if prompt is not None else self.render(messages or ())
        return list(range(len(text.split())))

    async def detokenize(self, model: str, tokens: list[int], as_strings: bool = False) -> str | list[str]:
        words = [f"w{t}" for t in tokens]
        return words if as_strings else " ".join(words)

    def _abort(self, request_id: str) -> None:
        if request_id in self.running:
            self.running.discard(request_id)
            self.aborted.append(request_id)

    async def _produce(self, rid: str, model: str, params: SamplingParams, stream: RequestStream,
                       prompt: str) -> None:
        prompt_tokens = len(prompt.split())
        tokens = fake_tokens(model, params.seed, params.max_tokens)
        prompt_text = prompt if params.echo else None
        prompt_logprobs = fake_prompt_logprobs(prompt, params.prompt_logprobs)
        if not tokens:  # max_tokens 0: the prompt scored, nothing generated
            stream.put(Delta("", (), "length", prompt_tokens, 0, prompt_logprobs=prompt_logprobs,
                             prompt_text=prompt_text))
        for i, token in enumerate(tokens):
            if self.delay:
                await asyncio.sleep(self.delay)
            if rid not in self.running:
                return
            logprobs: tuple[TokenLogprob, ...] = ()
            if params.logprobs is not None:
                top = tuple((f" alt{k}", -1.0 - k) for k in range(params.logprobs))
                logprobs = (TokenLogprob(token, -0.5, top),)
            last = i == len(tokens) - 1
            stream.put(Delta(token, logprobs, "length" if last else None, prompt_tokens, i + 1,
                             prompt_logprobs=prompt_logprobs if i == 0 else None,
                             prompt_text=prompt_text if i == 0 else None))
        self.running.discard(rid)
        self.finished.append(rid)

    # adapter admin
    def add_adapter(self, name: str, config_bytes: bytes, weights_path: Path, overwrite: bool = False,
                    contract_bytes: bytes | None = None) -> AdapterInfo:
        """The contract's signature: the weights arrive as a file the caller deletes afterwards."""
        if self.add_delay:
            time.sleep(self.add_delay)
        path = Path(weights_path)
        self.weights_paths.append(path)
        if path.stat().st_size > BIG_WEIGHTS:  # big uploads (memory tests): keep a digest, never the bytes
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
            return self._register(name, config_bytes, b"sha256:" + digest.hexdigest().encode(), overwrite)
        return self._register(name, config_bytes, path.read_bytes(), overwrite)

    def _register(self, name: str, config_bytes: bytes, weights_bytes: bytes, overwrite: bool) -> AdapterInfo:
        try:
            config = json.loads(config_bytes)
        except ValueError as exc:
            raise AdapterRejectedError(f"adapter_config.json is not valid JSON: {exc}") from exc
        if config.get("r", 0) > 16:
            raise AdapterRejectedError(f"rank {config['r']} is above --max-lora-rank 16")
        old = self.adapters.get(name)
        if old is not None and not overwrite:
            raise AdapterExistsError(f"adapter '{name}' exists; send overwrite=true to replace it")
        self.generation += 1
        info = AdapterInfo(name=name, version=old.version + 1 if old else 1, status="ready", error=None,
                               tier="disk", rank=config.get("r", 4), alpha=float(config.get("lora_alpha", 8)),
                               target_modules=("q_proj", "v_proj"), size_bytes=len(weights_bytes),
                               created=int(time.time()), sha256=identity(config_bytes, weights_bytes),
                               generation=self.generation)
        self.adapters[name] = info
        self.blobs[name] = (config_bytes, weights_bytes)
        return info

    def delete_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise UnknownModelError(f"The adapter '{name}' does not exist")
        del self.adapters[name]
        del self.blobs[name]

    def unload_adapter(self, name: str) -> None:
        """vLLM's unload: unregistered (a real store keeps the files)."""
        self.delete_adapter(name)

    def adapter_info(self, name: str) -> AdapterInfo:
        if name not in self.adapters:
            raise UnknownModelError(f"The adapter '{name}' does not exist")
        return replace(self.adapters[name], requests=sum(r.model == name for r in self.submitted))

    def list_adapters(self) -> list[AdapterInfo]:
        return [self.adapter_info(n) for n in self.adapters]

    def stats(self) -> EngineStats:
        return EngineStats(waiting=0, running=len(self.running), kv_blocks_used=3, kv_blocks_total=12,
                           adapters_on_device=1, adapters_on_cpu=2, preemptions=5)

    def patch_contract(self, name: str, patch: dict) -> AdapterInfo:
        """The fake keeps no contracts: the adapter as it is."""
        return self.adapter_info(name)

    def reload_adapter(self, name: str) -> AdapterInfo:
        raise UnknownModelError(f"The adapter '{name}' is not in the store")

    def adapter_folder(self, name: str) -> Path:
        return NO_STORE / name


if TYPE_CHECKING:
    def _is_engine_api(engine: FakeEngine) -> EngineAPI:
        return engine  # mypy checks here that the fake satisfies the protocol the app is typed against
