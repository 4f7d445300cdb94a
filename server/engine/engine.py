"""The engine facade the HTTP layer holds: one object, `EngineAPI`'s methods (protocol.py), no torch in sight.

It builds its owners once, each handed its collaborators at construction (keyword-only; nothing is
attached afterwards), and adds nothing of its own: the inbox (`inbox.py`: the one way into the engine
thread), the adapter manager (`adapters.py`: identity, tiers and device slots; it posts retired
versions to the inbox), the scheduler, the core (`core.py`: the step loop thread) and the front
(`front.py`: validation and tokenizing off the event loop).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from server.adapters.layout import BaseLayout
from server.config import Settings
from server.engine.adapters import AdapterManager
from server.engine.attention import decode_kernel_applies, use_paged_attention
from server.engine.core import EngineCore
from server.engine.front import EngineFront
from server.engine.grammar import GrammarCompiler
from server.engine.inbox import Inbox
from server.engine.kv_cache import KVCache
from server.engine.memory import MemoryUse, adapter_device_bytes, module_bytes
from server.engine.pool_size import device_free_bytes, lora_capacity
from server.engine.prefix_cache import PrefixCache
from server.engine.probe import probe_model
from server.engine.protocol import EngineAPI, EngineStats, ModelCard
from server.engine.request import AdapterInfo, GenerationRequest, GenerationResult, InvalidRequestError
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler
from server.engine.stream import RequestStream
from server.lora.model import LoraModel, padded_slot_bytes
from server.lora.ops import backend_for
from server.models import BaseModel, output_size, resolve_lora_dtype
from server.threads import run_in_fresh_thread


def _kv_cache(base: BaseModel, settings: Settings) -> KVCache:
    """`--kv-cache-tokens` when set, else as many tokens as `--kv-cache-gb` holds."""
    if settings.kv_cache_tokens is not None:
        return KVCache.from_token_budget(base.model.config, settings.kv_cache_tokens, settings.block_size,
                                         base.device, base.dtype)
    return KVCache.from_memory_budget(base.model.config, int(settings.kv_cache_gb * 2**30), settings.block_size,
                                      base.device, base.dtype)


class Engine:
    def __init__(self, base: BaseModel, settings: Settings) -> None:
        self.base = base
        self.base_name = base.name
        self.settings = settings
        self.tokenizer = base.tokenizer
        layout = BaseLayout.from_model(base.model)
        self.model_bytes = module_bytes(base.model)  # before LoRA wraps it
        # The model's compute dtype, not its first parameter's: a quantized base keeps uint8 blocks.
        lora_dtype = resolve_lora_dtype(settings.lora_dtype, base.dtype, base.device)
        backend = backend_for(base.device, base.dtype, settings.cpu_lora_kernel)
        self.kv_cache = _kv_cache(base, settings)  # first: on a GPU the adapters get what it leaves
        slots, pool_bytes = lora_capacity(settings, backend.pooled,
                                          padded_slot_bytes(layout, settings.max_lora_rank, lora_dtype),
                                          device_free_bytes(base.device))
        self.lora = LoraModel(base.model, layout, slots, settings.max_lora_rank, backend, lora_dtype, pool_bytes)
        paged = use_paged_attention(base.model)
        self.decode_kernel = decode_kernel_applies(base.device, base.dtype, settings.cpu_attention_kernel)
        self.probe_difference = probe_model(paged, self.kv_cache, self.decode_kernel)  # refuses what we cannot serve
        self._max_context = int(getattr(base.model.config, "max_position_embeddings", 2048))
        gen_eos = base.model.generation_config.eos_token_id
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        eos_ids = frozenset(i for i in [self.tokenizer.eos_token_id, *gen_eos] if i is not None)
        vocab_size = output_size(base.model)
        self.grammars = GrammarCompiler(self.tokenizer, vocab_size, sorted(eos_ids))
        inbox = Inbox()  # first: the registry posts retired versions to the engine thread through it
        self.adapters = AdapterManager(lora=self.lora, layout=layout, settings=settings, base_name=base.name,
                                       inbox=inbox, grammars=self.grammars)
        self.prefix_cache = PrefixCache(self.kv_cache.allocator, self.kv_cache.block_size, settings.prefix_cache)
        self.scheduler = Scheduler(allocator=self.kv_cache.allocator, block_size=self.kv_cache.block_size,
                                   max_batched_tokens=settings.max_batched_tokens,
                                   max_running=settings.max_running, admit=self.adapters.admit,
                                   release=self.adapters.release, copy_block=self.kv_cache.copy_block,
                                   prefix_cache=self.prefix_cache)
        runner = ModelRunner(self.lora, paged, self.kv_cache, self.decode_kernel)
        self.core = EngineCore(scheduler=self.scheduler, runner=runner, manager=self.adapters, inbox=inbox,
                               tokenizer=self.tokenizer, eos_ids=eos_ids, max_context=self._max_context,
                               threads=settings.threads, grammars=self.grammars)
        self.front = EngineFront(core=self.core, manager=self.adapters, tokenizer=self.tokenizer,
                                 max_queue=settings.max_queue, max_context=self._max_context,
                                 kv_capacity=self.kv_cache.num_slots,
                                 long_prompt_niceness=settings.background_niceness, grammars=self.grammars,
                                 vocab_size=vocab_size)

    # Parts tests and tools look at ------------------------------------------------------------

    @property
    def registry(self):
        return self.adapters.registry

    @property
    def slots(self):
        return self.adapters.slots

    @property
    def eos_ids(self) -> frozenset[int]:
        return self.core.eos_ids

    # Lifecycle --------------------------------------------------------------------------------

    def load_store(self) -> dict[str, str]:
        """Recover the store and register its adapters; returns the rejected folders with their errors."""
        return self.adapters.load_store()

    def start(self) -> None:
        self.core.start()

    def begin_shutdown(self) -> None:
        """Stop admitting: later `submit` calls raise ShuttingDownError; running requests go on."""
        self.front.shutting_down = True

    def num_active(self) -> int:
        """Requests' sequences being tokenized, waiting or running."""
        return self.front.num_tokenizing + self.core.num_active()

    def stop(self) -> None:
        self.core.stop()
        self.front.close()
        self.registry.close()

    @property
    def running(self) -> bool:
        return self.core.running

    @property
    def ready(self) -> bool:
        """The model is loaded and the step loop runs (what /ready answers)."""
        return self.core.running

    # Requests ---------------------------------------------------------------------------------

    async def submit(self, request: GenerationRequest) -> list[RequestStream]:
        """Validate, tokenize off the loop, enqueue; one stream per choice. Raises EngineError subclasses."""
        sync = self.adapters.store_sync
        if sync is not None and sync.stale():  # one small file read per request; a sync only after a change
            await asyncio.to_thread(self.sync_store)
        return await self.front.submit(request)

    def sync_store(self) -> None:
        """Take in what other servers wrote to a shared store (a no-op for a store of this server alone)."""
        sync = self.adapters.store_sync
        if sync is not None and sync.stale():
            run_in_fresh_thread(sync.refresh)  # parsing touches torch: never on a long-lived thread

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Submit and wait for the whole result (non-streamed responses, n == 1)."""
        if request.n != 1:
            raise InvalidRequestError("generate serves n == 1; use submit for several choices")
        (stream,) = await self.submit(request)
        return await stream.collect()

    def abort(self, key: str) -> None:
        self.core.abort(key)

    async def tokenize(self, model: str, prompt: str | None = None, messages: tuple[dict, ...] | None = None,
                       add_special_tokens: bool = True, add_generation_prompt: bool = True,
                       apply_template: bool = False) -> list[int]:
        return await self.front.tokenize(model, prompt, messages, add_special_tokens, add_generation_prompt,
                                         apply_template)

    async def detokenize(self, model: str, tokens: list[int], as_strings: bool = False) -> str | list[str]:
        return await self.front.detokenize(model, tokens, as_strings)

    def max_context(self) -> int:
        return self._max_context

    def _base_root(self) -> str:
        """The base model's folder as an absolute path (what a client such as lm-eval can load), else its name."""
        folder = getattr(self.base.model, "name_or_path", "") or ""
        return str(Path(folder).absolute()) if folder and Path(folder).is_dir() else self.base_name

    def models(self) -> list[ModelCard]:
        self.sync_store()
        cards = [ModelCard(self.base_name, 0, None, root=self._base_root())]
        # Registration order, as vLLM lists them (an overwrite registers a new version: it moves last).
        cards += [ModelCard(r.name, int(r.created), self.base_name, r.sha256, r.version,
                            r.contract.as_dict() if r.contract else None, root=str(r.folder.absolute()))
                  for r in sorted(self.registry.records(), key=lambda r: r.generation)]
        return cards

    def stats(self) -> EngineStats:
        allocator = self.kv_cache.allocator
        on_device, on_cpu = self.adapters.counts()
        return EngineStats(waiting=self.core.num_waiting(), running=len(self.scheduler.running),
                           kv_blocks_used=allocator.num_total - allocator.num_free,
                           kv_blocks_total=allocator.num_total, adapters_on_device=on_device,
                           adapters_on_cpu=on_cpu, prefill_tokens=self.core.prefill_tokens,
                           kv_blocks_cached=allocator.num_cached,
                           prefix_cache_queried_tokens=self.prefix_cache.queried_tokens,
                           prefix_cache_hit_tokens=self.prefix_cache.hit_tokens,
                           preemptions=self.scheduler.preemptions, memory=self.memory(),
                           adapter_pool=self.adapters.pool_stats())

    def memory(self) -> MemoryUse:
        return MemoryUse(model_bytes=self.model_bytes, kv_cache_bytes=self.kv_cache.bytes,
                         adapter_device_bytes=adapter_device_bytes(self.lora, self.model_bytes),
                         adapter_cpu_bytes=self.registry.cpu_bytes())

    # Adapter admin (sync: the API calls these with asyncio.to_thread) ---------------------------

    def add_adapter(self, name: str, config_bytes: bytes, weights_path: Path, overwrite: bool = False,
                    contract_bytes: bytes | None = None) -> AdapterInfo:
        """Validate, hash and store an adapter whose weights are a file (copied; the path is not kept)."""
        self.sync_store()
        return self.adapters.add(name, config_bytes, Path(weights_path), overwrite, contract_bytes)

    def patch_contract(self, name: str, patch: dict) -> AdapterInfo:
        """Merge-patch the adapter's loraplex.json: a new version (same weights), identity included."""
        self.sync_store()
        return self.adapters.patch_contract(name, patch)

    def delete_adapter(self, name: str) -> None:
        self.sync_store()
        self.adapters.delete(name)

    def unload_adapter(self, name: str) -> None:
        """Unregister `name`, keep its files in the store (vLLM's unload); a restart keeps it unloaded."""
        self.adapters.unload(name)

    def reload_adapter(self, name: str) -> AdapterInfo:
        """Register `name` again from its own store folder (after an unload)."""
        return self.adapters.reload(name)

    def adapter_folder(self, name: str) -> Path:
        """Where the store keeps (or would keep) adapter `name`."""
        return self.adapters.store_folder(name)

    def adapter_info(self, name: str) -> AdapterInfo:
        self.sync_store()
        return self.adapters.get_info(name)

    def list_adapters(self) -> list[AdapterInfo]:
        self.sync_store()
        return [self.adapters.info(r) for r in self.registry.records()]


if TYPE_CHECKING:
    def _is_engine_api(engine: Engine) -> EngineAPI:
        return engine  # mypy checks here that the engine satisfies the protocol the app is typed against
