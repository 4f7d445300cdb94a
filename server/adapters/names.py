"""Adapter names and file names: the one place that defines them."""

from __future__ import annotations

import re

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CONTRACT_FILE = "loraplex.json"  # optional: the adapter's contract (server/adapters/contract.py)
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


class AdapterNameError(ValueError):
    """A name the registry refuses; the message says why."""


def check_adapter_name(name: str, reserved: frozenset[str] = frozenset()) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AdapterNameError(f"invalid adapter name {name!r}: use 1-64 characters of [A-Za-z0-9._-], "
                               "not starting with '.'")
    if name in reserved:
        raise AdapterNameError(f"adapter name {name!r} is reserved for the base model")
