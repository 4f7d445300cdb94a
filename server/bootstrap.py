"""Start-up shared by `loraplex serve` (server/cli.py) and every cluster replica (server/deploy/ray_serve.py):
the engine built and started from one `Settings`, and the one line that says what it serves.

This module imports neither the CLI nor the deployment, so both can import it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from server.config import Settings

if TYPE_CHECKING:
    from server.engine.engine import Engine

log = logging.getLogger(__name__)


def build_engine(settings: Settings) -> Engine:
    """The model and the engine, started (runs in the loading thread while the server already listens)."""
    from server.engine.engine import Engine
    from server.models import load_base_model

    engine = Engine(load_base_model(settings), settings)
    engine.load_store()
    engine.start()
    log.info(startup_summary(engine, settings))
    return engine


def _lora_memory(engine: Engine) -> str:
    lora = engine.lora
    if lora.capacity_bytes is None:
        return f"{lora.max_loras} padded device slots"
    return f"a {lora.capacity_bytes / 2**30:.2f} GiB adapter pool (up to {lora.max_loras} adapters)"


def startup_summary(engine: Engine, settings: Settings) -> str:
    """One line that says what is being served and how (no secrets: only whether keys are set)."""
    import torch

    base, threads = engine.base, settings.threads or torch.get_num_threads()
    on = {True: "on", False: "off"}
    slot_dtype = str(engine.lora.weight_dtype).removeprefix("torch.")
    return (f"serving {engine.base_name} on {base.device} ({str(base.dtype).removeprefix('torch.')}, weights "
            f"{engine.model_bytes / 2**20:.0f} MiB), "
            f"{len(engine.list_adapters())} adapters in {settings.adapters_dir}, {_lora_memory(engine)} "
            f"(rank <= {settings.max_lora_rank}, {slot_dtype} weights, LoRA op {engine.lora.backend.name}), "
            f"decode attention {'cpu-kernel' if engine.decode_kernel else 'torch'}, "
            f"KV cache {engine.kv_cache.num_slots} tokens ({engine.kv_cache.bytes / 2**30:.2f} GiB), {threads} "
            f"threads, API key {on[bool(settings.api_key)]}, admin {on[bool(settings.admin_token)]}, "
            f"http://{settings.host}:{settings.port}")
