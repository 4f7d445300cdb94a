"""Read an adapter folder named by `/v1/load_lora_adapter`, confined to `--allowed-adapter-root`.

The path (absolute, or relative to the root) must resolve, symbolic links followed, to a
folder under the root; the two adapter files are opened without following links
(`O_NOFOLLOW`), must be regular files, and are copied with bounded reads into a
temporary work folder (the engine gets a file nobody can swap under it).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO

from server.adapters.contract import MAX_CONTRACT_BYTES
from server.adapters.names import CONFIG_FILE, CONTRACT_FILE, WEIGHTS_FILE
from server.api.archives import COPY_CHUNK, pickle_message
from server.api.errors import ApiError
from server.api.uploads import MAX_CONFIG_BYTES

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


def read_contract(folder: Path) -> bytes | None:
    """The folder's loraplex.json (opened like the adapter files), or None when it has none."""
    if not os.path.lexists(folder / CONTRACT_FILE):
        return None
    with _open_regular(folder / CONTRACT_FILE) as handle:
        data = handle.read(MAX_CONTRACT_BYTES + 1)
    if len(data) > MAX_CONTRACT_BYTES:
        raise ApiError(400, f"{CONTRACT_FILE} is larger than {MAX_CONTRACT_BYTES} bytes", code="invalid_adapter",
                       param="lora_path")
    return data


def copy_adapter_folder(lora_path: str, root: Path | None, limit: int,
                        tmp_root: Path | None = None) -> tuple[bytes, Path, Path]:
    """(config bytes, weights copied to a temp file, the work folder holding it) of the folder at `lora_path`.

    The caller removes the work folder; on failure nothing is left.
    """
    folder = resolve_under_root(lora_path, root)
    if not (folder / WEIGHTS_FILE).exists() and (folder / "adapter_model.bin").exists():
        raise ApiError(400, pickle_message("adapter_model.bin"), code="invalid_adapter", param="lora_path")
    with _open_regular(folder / CONFIG_FILE) as handle:
        config = _bounded_read(handle, min(limit, MAX_CONFIG_BYTES))
    workdir = Path(tempfile.mkdtemp(prefix="loraplex-load-", dir=tmp_root))
    try:
        weights = workdir / WEIGHTS_FILE
        with _open_regular(folder / WEIGHTS_FILE) as source, open(weights, "wb") as target:
            room = limit - len(config)
            while chunk := source.read(COPY_CHUNK):
                room -= len(chunk)
                if room < 0:
                    raise _too_large()
                target.write(chunk)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return config, weights, workdir


def _too_large() -> ApiError:
    return ApiError(413, "the adapter is larger than the limit (--max-adapter-bytes)", code="adapter_too_large",
                    param="lora_path")


def _bounded_read(handle: BinaryIO, room: int) -> bytes:
    data = handle.read(room + 1)
    if len(data) > room:
        raise _too_large()
    return data


def _open_regular(path: Path) -> BinaryIO:
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
    handle = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
        handle.close()
        raise ApiError(400, f"{path.name} is not a regular file", code="invalid_adapter", param="lora_path")
    return handle
