"""The engine front: resolves the requested model, pins its adapter slot, and generates.

This first version serves one request at a time on a worker thread; the HTTP layer only
awaits `generate` and never touches torch.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path

from server.adapters.layout import BaseLayout
from server.adapters.registry import AdapterRecord, AdapterRegistry
from server.adapters.slots import NoFreeSlotError, SlotTable
from server.config import Settings
from server.engine.generate import generate_batch
from server.engine.request import (AdapterUnavailableError, GenerationRequest, GenerationResult,
                                   PromptTooLongError, UnknownModelError)
from server.lora.model import LoraModel
from server.models import BaseModel


@dataclass(frozen=True)
class ModelCard:
    """One entry of `GET /v1/models`."""

    id: str
    created: int
    parent: str | None


class Engine:
    def __init__(self, base: BaseModel, settings: Settings) -> None:
        self.base = base
        self.settings = settings
        layout = BaseLayout.from_model(base.model)
        self.lora = LoraModel(base.model, layout, settings.max_loras, settings.max_lora_rank)
        self.registry = AdapterRegistry(layout, settings.max_lora_rank, reserved_names=frozenset({base.name}))
        self.slots = SlotTable(settings.max_loras)
        self.max_context = int(getattr(base.model.config, "max_position_embeddings", 2048))
        tok = base.tokenizer
        self.eos_ids = sorted({i for i in (tok.eos_token_id, base.model.generation_config.eos_token_id) if i is not None})
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_ids[0]
        self._lock = threading.Lock()

    def load_store(self, store: Path) -> dict[str, str]:
        return self.registry.scan(store)

    def models(self) -> list[ModelCard]:
        cards = [ModelCard(self.base.name, 0, None)]
        for name in self.registry.names():
            record = self.registry.get(name)
            if record is not None:
                cards.append(ModelCard(name, int(record.created), self.base.name))
        return cards

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await asyncio.to_thread(self._generate_blocking, request)

    def _resolve(self, model: str) -> AdapterRecord | None:
        if model == self.base.name:
            return None
        record = self.registry.get(model)
        if record is None:
            raise UnknownModelError(f"The model '{model}' does not exist: it is neither the base model "
                                    f"'{self.base.name}' nor a registered adapter")
        return record

    def _generate_blocking(self, request: GenerationRequest) -> GenerationResult:
        record = self._resolve(request.model)
        prompt_ids = self.base.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
        params = request.params
        if not prompt_ids:
            raise PromptTooLongError("the prompt is empty")
        if len(prompt_ids) + params.max_tokens > self.max_context:
            raise PromptTooLongError(f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) "
                                     f"exceeds the model's context of {self.max_context} tokens")
        with self._lock:
            slot = -1
            if record is not None:
                try:
                    slot = self.slots.acquire(record.key, lambda s: self.lora.write_slot(s, record.adapter))
                except NoFreeSlotError as exc:
                    raise AdapterUnavailableError(str(exc)) from exc
            try:
                new_ids = generate_batch(self.lora, [prompt_ids], [slot], params.max_tokens, self.eos_ids,
                                         self.pad_id, params.temperature, params.top_p, params.seed)[0]
            finally:
                if slot >= 0:
                    self.slots.release(slot)
        return self._finish(len(prompt_ids), new_ids, params.stop)

    def _finish(self, prompt_tokens: int, new_ids: list[int], stop: tuple[str, ...]) -> GenerationResult:
        hit_eos = bool(new_ids) and new_ids[-1] in self.eos_ids
        text = self.base.tokenizer.decode(new_ids[:-1] if hit_eos else new_ids, skip_special_tokens=False)
        finish = "stop" if hit_eos else "length"
        cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        return GenerationResult(text=text, finish_reason=finish, prompt_tokens=prompt_tokens,
                                completion_tokens=len(new_ids))
