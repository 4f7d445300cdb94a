"""The real default model behind a real `loraplex serve`, and an in-process engine as the oracle.

The oracle is an `Engine` built in the test process on a copy of the server's adapter
store: what it generates (greedy) is what the server must send back over HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import shutil
import uuid
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from server.adapters.names import CONFIG_FILE, WEIGHTS_FILE
from server.config import Settings
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, SamplingParams
from server.models import load_base_model
from tests.conftest import TEST_CACHE
from tests.peft_adapters import save_adapter as save_peft_adapter

ADMIN = "real-admin-token"
KEY = "real-api-key"
BASE_NAME = "SmolLM2-135M-Instruct"
MAX_ADAPTER_BYTES = 16_000_000
ADAPTERS = {  # name -> (seed, LoRA config)
    "alpha": (1, dict(r=8, lora_alpha=16, target_modules="all-linear")),
    "beta": (2, dict(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])),
    "gamma": (3, dict(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "up_proj"])),
}


def fresh_base():
    return load_base_model(Settings(cache_dir=TEST_CACHE, device="cpu"))


def save_adapter(base_model: torch.nn.Module, folder: Path, seed: int, **lora) -> Path:
    return save_peft_adapter(base_model, folder, seed, scale_b=0.3, **lora)


def identity_hash(config: bytes, weights: bytes) -> str:
    """The contract's adapter identity over the exact stored bytes."""
    return hashlib.sha256(b"loraplex-adapter-v1\0" + len(config).to_bytes(8, "little") + config + weights).hexdigest()


def adapter_files(folder: Path) -> tuple[bytes, bytes]:
    return (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()


def zipped(folder: Path, prefix: str = "adapter/") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, prefix + path.name)
    return buffer.getvalue()


def edited_weights(weights: bytes, edit) -> bytes:
    tensors = load_safetensors(weights)
    edit(tensors)
    return save_safetensors(tensors)


def edited_config(config: bytes, **changes) -> bytes:
    return json.dumps({**json.loads(config), **changes}).encode()


def store_snapshot(store: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(store)): (p.stat().st_size, p.stat().st_mtime_ns) for p in store.rglob("*")}


class Oracle:
    """An in-process engine on a copy of the store: the expected output of every greedy request."""

    def __init__(self, store: Path, scratch: Path) -> None:
        copy_dir = scratch / "oracle-store"
        shutil.copytree(store, copy_dir)
        settings = Settings(cache_dir=TEST_CACHE, device="cpu", adapters_dir=copy_dir)
        self.engine = Engine(fresh_base(), settings)
        self.engine.load_store()
        self.engine.start()

    def add(self, name: str, folder: Path) -> None:
        self.engine.add_adapter(name, (folder / CONFIG_FILE).read_bytes(), folder / WEIGHTS_FILE, False)

    def greedy(self, items: list[tuple[str, str | list[dict], int]]) -> list[str]:
        """(model, prompt or chat messages, max_tokens) -> text, all generated in one batch."""
        def request(model: str, prompt: str | list[dict], tokens: int) -> GenerationRequest:
            params = SamplingParams(max_tokens=tokens, temperature=0.0)
            if isinstance(prompt, str):
                return GenerationRequest(uuid.uuid4().hex, model, prompt, params)
            return GenerationRequest(uuid.uuid4().hex, model, None, params, messages=tuple(prompt))

        async def run() -> list[str]:
            streams = [(await self.engine.submit(request(*item)))[0] for item in items]
            return [(await s.collect()).text for s in streams]
        return asyncio.run(run())

    def stop(self) -> None:
        self.engine.stop()
