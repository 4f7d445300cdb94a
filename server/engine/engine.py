"""The engine: the one owner of the model, running a step loop on a background thread.

The HTTP layer calls `submit(request)` on the event loop and consumes the returned
`RequestStream`; it never touches torch. Every step, the scheduler picks which sequences
run, the runner feeds them all through ONE packed forward pass whatever adapter each uses,
and the sampler picks every sampled sequence's next token in one vectorised pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from server.adapters.layout import BaseLayout
from server.adapters.peft_format import AdapterFormatError
from server.adapters.registry import ERROR, AdapterExists, AdapterRecord, AdapterRegistry
from server.adapters.slots import NoFreeSlotError, SlotTable
from server.adapters.store import AdapterStore
from server.config import Settings
from server.engine.attention import use_paged_attention
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.kv_cache import KVCache
from server.engine.output import finish_reason, make_delta
from server.engine.request import (AdapterExistsError, AdapterInfo, AdapterRejectedError, AdapterUnavailableError,
                                   EngineError, EngineNotReadyError, GenerationRequest, GenerationResult, PromptTooLongError,
                                   QueueFullError, UnknownModelError)
from server.engine.runner import ModelRunner
from server.engine.sampler import Sampler, SamplingOptions, make_generator
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence, SeqStatus
from server.engine.stream import RequestStream
from server.lora.model import LoraModel
from server.models import BaseModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelCard:
    """One entry of `GET /v1/models`."""

    id: str
    created: int
    parent: str | None


@dataclass(frozen=True)
class EngineStats:
    waiting: int
    running: int
    kv_blocks_used: int
    kv_blocks_total: int
    adapters_on_device: int
    adapters_on_cpu: int


class Engine:
    def __init__(self, base: BaseModel, settings: Settings) -> None:
        self.base = base
        self.base_name = base.name
        self.settings = settings
        self.tokenizer = base.tokenizer
        layout = BaseLayout.from_model(base.model)
        self.lora = LoraModel(base.model, layout, settings.max_loras, settings.max_lora_rank)
        use_paged_attention(base.model)
        self.kv_cache = KVCache.from_token_budget(base.model.config, settings.kv_cache_tokens, settings.block_size,
                                                  base.device, base.dtype)
        self.registry = AdapterRegistry(AdapterStore(settings.adapters_dir), layout, settings.max_lora_rank,
                                        settings.max_cpu_loras, reserved_names=frozenset({base.name}))
        self.slots = SlotTable(settings.max_loras)
        self.scheduler = Scheduler(self.kv_cache.allocator, self.kv_cache.block_size, settings.max_batched_tokens,
                                   settings.max_running, self._admit, self._release)
        self.runner = ModelRunner(self.lora, self.kv_cache)
        self.sampler = Sampler()
        config = base.model.config
        self._max_context = int(getattr(config, "max_position_embeddings", 2048))
        gen_eos = base.model.generation_config.eos_token_id
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.eos_ids = frozenset(i for i in [self.tokenizer.eos_token_id, *gen_eos] if i is not None)
        self._inbox: deque[tuple[str, object]] = deque()
        self._seqs: dict[str, Sequence] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # Lifecycle ---------------------------------------------------------------------------------

    def load_store(self) -> dict[str, str]:
        return self.registry.scan()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.registry.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # Requests ----------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Validate and enqueue a request (call on the event loop); raises EngineError subclasses."""
        if not self.running:
            raise EngineNotReadyError("the engine is not running yet")
        record = self._resolve(request.model)
        params = request.params
        prompt_ids = self.tokenizer(request.prompt, add_special_tokens=request.add_special_tokens)["input_ids"]
        if not prompt_ids:
            raise PromptTooLongError("the prompt is empty")
        if len(prompt_ids) + params.max_tokens > self._max_context:
            raise PromptTooLongError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) "
                                     f"exceeds the model's context of {self._max_context} tokens")
        if len(self.scheduler.waiting) + len(self._inbox) >= self.settings.max_queue:
            raise QueueFullError(f"the queue is full ({self.settings.max_queue} waiting requests); retry later")
        stream = RequestStream(request.request_id, self.abort)
        options = SamplingOptions(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                  presence_penalty=params.presence_penalty,
                                  frequency_penalty=params.frequency_penalty, logprobs=params.logprobs,
                                  seed=params.seed)
        seq = Sequence(request_id=request.request_id, prompt_len=len(prompt_ids), token_ids=list(prompt_ids),
                       params=params, options=options, generator=make_generator(params.seed),
                       detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop),
                       stream=stream, record=record,
                       adapter=None if record is None else self.registry.cached(record))
        if record is not None:
            record.requests += 1
        self._post("add", seq)
        return stream

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Submit and wait for the whole result (non-streamed responses)."""
        return await self.submit(request).collect()

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def max_context(self) -> int:
        return self._max_context

    def models(self) -> list[ModelCard]:
        cards = [ModelCard(self.base_name, 0, None)]
        cards += [ModelCard(r.name, int(r.created), self.base_name) for r in self.registry.records()]
        return cards

    def stats(self) -> EngineStats:
        allocator = self.kv_cache.allocator
        records = self.registry.records()
        return EngineStats(waiting=len(self.scheduler.waiting) + len(self._inbox),
                           running=len(self.scheduler.running),
                           kv_blocks_used=allocator.num_total - allocator.num_free,
                           kv_blocks_total=allocator.num_total,
                           adapters_on_device=sum(self.slots.slot_of(r.key) is not None for r in records),
                           adapters_on_cpu=sum(self.registry.in_cpu(r) for r in records))

    # Adapter admin -----------------------------------------------------------------------------

    def add_adapter(self, name: str, config_bytes: bytes, weights_bytes: bytes, overwrite: bool = False) -> AdapterInfo:
        return self._info(self._registering(lambda: self.registry.add(name, config_bytes, weights_bytes, overwrite)))

    def delete_adapter(self, name: str) -> None:
        record = self.registry.remove(name)
        if record is None:
            raise UnknownModelError(f"adapter '{name}' does not exist")
        self._post("evict", record.key)

    def adapter_info(self, name: str) -> AdapterInfo:
        record = self.registry.get(name)
        if record is None:
            raise UnknownModelError(f"adapter '{name}' does not exist")
        return self._info(record)

    def list_adapters(self) -> list[AdapterInfo]:
        return [self._info(r) for r in self.registry.records()]

    def _registering(self, register) -> AdapterRecord:
        try:
            record = register()
        except AdapterFormatError as exc:
            raise AdapterRejectedError(str(exc)) from exc
        except AdapterExists as exc:
            raise AdapterExistsError(str(exc)) from exc
        if record.version > 1:
            self._post("evict", (record.name, record.version - 1))
        return record

    def _info(self, record: AdapterRecord) -> AdapterInfo:
        tier = "device" if self.slots.slot_of(record.key) is not None else \
            "cpu" if self.registry.in_cpu(record) else "disk"
        return AdapterInfo(name=record.name, version=record.version, status=record.status, error=record.error,
                           tier=tier, rank=record.rank, alpha=record.alpha, target_modules=record.target_modules,
                           size_bytes=record.size_bytes, created=int(record.created), requests=record.requests,
                           tokens=record.tokens, loads=record.loads, load_seconds=record.load_seconds)

    def _resolve(self, model: str) -> AdapterRecord | None:
        if model == self.base_name:
            return None
        record = self.registry.get(model)
        if record is None:
            raise UnknownModelError(f"The model '{model}' does not exist: it is neither the base model "
                                    f"'{self.base_name}' nor a registered adapter")
        if record.status == ERROR:
            raise AdapterUnavailableError(f"adapter '{model}' failed to load: {record.error}")
        return record

    # The engine thread -------------------------------------------------------------------------

    def _post(self, kind: str, payload: object) -> None:
        self._inbox.append((kind, payload))
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping:
            self._drain_inbox()
            self._fail_unloadable()
            if not self.scheduler.has_work():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                if not self._step():
                    self._wake.wait(timeout=0.005)  # everything waits on an adapter load
                    self._wake.clear()
            except Exception:  # a bug must not kill the server: fail the batch, keep serving
                log.exception("engine step failed")
                for seq in list(self.scheduler.running):
                    self._fail(seq, EngineError("internal error while generating; see the server log"))

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, payload = self._inbox.popleft()
            if kind == "add":
                self._seqs[payload.request_id] = payload
                self.scheduler.add(payload)
            elif kind == "abort":
                seq = self._seqs.pop(payload, None)
                if seq is not None:
                    self.scheduler.finish(seq)
            elif kind == "evict":
                self._evict_if_idle(payload)

    def _fail_unloadable(self) -> None:
        for seq in list(self.scheduler.waiting):
            record = seq.record
            if record is None or seq.adapter is not None:
                continue
            if record.status == ERROR:
                self._fail(seq, AdapterUnavailableError(f"adapter '{record.name}' failed to load: {record.error}"))
            elif record.deleted and not self.registry.in_cpu(record):
                self._fail(seq, AdapterUnavailableError(f"adapter '{record.name}' was replaced or deleted "
                                                        "before the request started; retry"))

    def _step(self) -> bool:
        plan = self.scheduler.schedule()
        if not plan:
            return False
        ordered, logits = self.runner.step(plan)
        rows = [i for i, item in enumerate(ordered) if item.samples]
        if not rows:
            return True
        seqs = [ordered[i].seq for i in rows]
        outs = self.sampler.sample(logits[rows], [s.options for s in seqs], [s.generator for s in seqs],
                                   [s.output_ids for s in seqs])
        for seq, out in zip(seqs, outs):
            self._append(seq, out)
        return True

    def _append(self, seq: Sequence, out) -> None:
        seq.token_ids.append(out.token)
        if seq.record is not None:
            seq.record.tokens += 1
        is_eos = out.token in self.eos_ids
        text = "" if is_eos and not seq.params.ignore_eos else seq.detokenizer.push(out.token)
        reason = finish_reason(seq, is_eos, self._max_context)
        if reason is not None:
            text += seq.detokenizer.finish()
            self._seqs.pop(seq.request_id, None)
            self.scheduler.finish(seq)
        seq.stream.put(make_delta(self.tokenizer, seq, text, out, reason))

    def _fail(self, seq: Sequence, error: EngineError) -> None:
        self._seqs.pop(seq.request_id, None)
        self.scheduler.finish(seq)
        seq.stream.put(error)

    # Slots: called by the scheduler on the engine thread ----------------------------------------

    def _admit(self, seq: Sequence) -> bool:
        """Pin a device slot for the sequence's adapter; False while it is loading or slots are full."""
        if seq.record is None:
            seq.slot = -1
            return True
        if seq.adapter is None:
            seq.adapter = self.registry.cached(seq.record)
            if seq.adapter is None:
                self.registry.request_load(seq.record)
                return False
        try:
            seq.slot = self.slots.acquire(seq.record.key, lambda slot: self._load_slot(slot, seq))
        except NoFreeSlotError:
            return False
        return True

    def _load_slot(self, slot: int, seq: Sequence) -> None:
        started = time.perf_counter()
        self.lora.write_slot(slot, seq.adapter)
        seq.record.loads += 1
        seq.record.load_seconds = time.perf_counter() - started

    def _release(self, seq: Sequence) -> None:
        if seq.slot is not None and seq.slot >= 0:
            self.slots.release(seq.slot)
            if seq.record is not None and seq.record.deleted:
                self._evict_if_idle(seq.record.key)
        seq.slot = None

    def _evict_if_idle(self, key: tuple[str, int]) -> None:
        """Free the slot of a deleted or superseded adapter version once nothing runs on it."""
        slot = self.slots.forget(key)
        if slot is not None:
            self.lora.clear_slot(slot)
