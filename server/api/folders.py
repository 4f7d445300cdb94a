"""Read an adapter folder named by `/v1/load_lora_adapter`, confined to `--allowed-adapter-root`.

The path (absolute, or relative to the root) must resolve, symbolic links followed, to a
folder under the root; the two adapter files are opened without following links
(`O_NOFOLLOW`), must be regular files, and are read with bounded reads.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from server.api.archives import CONFIG_FILE, WEIGHTS_FILE, pickle_message
from server.api.errors import ApiError

ROOT_UNSET = ("Loading adapters from a server path is disabled: start the server with "
              "LORAPLEX_ALLOWED_ADAPTER_ROOT (or --allowed-adapter-root) set to the folder adapters may be "
              "read from, or upload the adapter with POST /v1/adapters.")


def resolve_under_root(lora_path: str, root: Path | None) -> Path:
    if root is None:
        raise ApiError(403, ROOT_UNSET, code="path_not_allowed", param="lora_path")
    if not lora_path or "\x00" in lora_path:
        raise ApiError(400, "lora_path is empty or invalid", code="invalid_value", param="lora_path")
    try:
        real_root = root.resolve(strict=True)
        candidate = Path(lora_path) if os.path.isabs(lora_path) else real_root / lora_path
        real = candidate.resolve(strict=False)
    except (OSError, RuntimeError) as exc:
        raise ApiError(400, f"lora_path cannot be resolved: {exc.__class__.__name__}", code="invalid_value",
                       param="lora_path") from exc
    # Containment is checked before existence, so nothing is revealed about paths outside the root.
    if real != real_root and real_root not in real.parents:
        raise ApiError(403, f"lora_path {lora_path!r} is outside the allowed adapter root",
                       code="path_not_allowed", param="lora_path")
    if not real.is_dir():
        raise ApiError(404, f"no adapter folder at {lora_path!r}", code="adapter_folder_not_found",
                       param="lora_path")
    return real


def read_adapter_folder(lora_path: str, root: Path | None, limit: int) -> tuple[bytes, bytes]:
    """(config bytes, weights bytes) of the adapter folder at `lora_path`."""
    folder = resolve_under_root(lora_path, root)
    if not (folder / WEIGHTS_FILE).exists() and any((folder / n).exists() for n in ("adapter_model.bin",)):
        raise ApiError(400, pickle_message("adapter_model.bin"), code="invalid_adapter", param="lora_path")
    config = _read_file(folder / CONFIG_FILE, limit)
    weights = _read_file(folder / WEIGHTS_FILE, limit - len(config))
    return config, weights


def _read_file(path: Path, room: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise ApiError(400, f"the adapter folder has no {path.name}", code="invalid_adapter",
                       param="lora_path") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ApiError(400, f"{path.name} is a symbolic link; links are refused", code="invalid_adapter",
                           param="lora_path") from exc
        raise ApiError(400, f"{path.name} cannot be opened: {exc.strerror}", code="invalid_adapter",
                       param="lora_path") from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ApiError(400, f"{path.name} is not a regular file", code="invalid_adapter", param="lora_path")
        if info.st_size > room:
            raise ApiError(413, f"the adapter is larger than the limit (--max-adapter-bytes)",
                           code="adapter_too_large", param="lora_path")
        data = handle.read(room + 1)
    if len(data) > room:
        raise ApiError(413, "the adapter is larger than the limit (--max-adapter-bytes)",
                       code="adapter_too_large", param="lora_path")
    return data
