"""Adapter identity: the SHA-256 of the exact stored bytes plus a registry generation.

The generation only grows (it is persisted, see `state.py`), so no two registered versions
of any name ever share a key, even across delete + re-upload or a restart. Everything that
caches adapter data (device slots, the CPU tier, loads in flight) is keyed by `AdapterKey`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from server.adapters.peft_config import AdapterFormatError

_DOMAIN = b"loraplex-adapter-v1\0"
_DOMAIN_WITH_CONTRACT = b"loraplex-adapter-v2\0"  # a loraplex.json is part of the identity
_CHUNK = 1 << 20


@dataclass(frozen=True, order=True)
class AdapterKey:
    """Identity of one registered version: unique by `generation`, auditable by `sha256`."""

    generation: int
    sha256: str


def adapter_sha256(config_bytes: bytes, weights_bytes: bytes, contract_bytes: bytes | None = None) -> str:
    """sha256(b"loraplex-adapter-v1\\0" + len(config) as 8 little-endian bytes + config + weights), hex.

    With a contract: b"loraplex-adapter-v2\\0" + len(config) + config + len(contract) + contract + weights,
    so two versions that differ only in their contract never share an identity.
    """
    digest = _start(config_bytes, contract_bytes)
    digest.update(weights_bytes)
    return digest.hexdigest()


def file_sha256(config_bytes: bytes, weights_path: Path, max_bytes: int | None = None,
                contract_bytes: bytes | None = None) -> str:
    """`adapter_sha256` of a weights file (of at most `max_bytes`), read in chunks: the GIL is free meanwhile."""
    digest = _start(config_bytes, contract_bytes)
    try:
        with open(weights_path, "rb") as handle:
            if max_bytes is not None and os.fstat(handle.fileno()).st_size > max_bytes:
                raise AdapterFormatError(f"the adapter weights exceed this server's limit of {max_bytes} bytes")
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise AdapterFormatError(f"cannot read the adapter weights: {exc.strerror}") from None
    return digest.hexdigest()


def _start(config_bytes: bytes, contract_bytes: bytes | None = None):
    digest = hashlib.sha256(_DOMAIN if contract_bytes is None else _DOMAIN_WITH_CONTRACT)
    digest.update(len(config_bytes).to_bytes(8, "little"))
    digest.update(config_bytes)
    if contract_bytes is not None:
        digest.update(len(contract_bytes).to_bytes(8, "little"))
        digest.update(contract_bytes)
    return digest
