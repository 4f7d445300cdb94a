"""Reading one adapter folder of the store: its files, its contract and its identity."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from server.adapters.contract import AdapterContract, parse_contract
from server.adapters.identity import file_sha256
from server.adapters.names import CONFIG_FILE, CONTRACT_FILE, WEIGHTS_FILE
from server.adapters.peft_format import AdapterFormatError, ParsedAdapter

Parse = Callable[[bytes, Path], ParsedAdapter]  # (config bytes, weights file) -> the adapter, within limits
LoadFolder = Callable[[Path], ParsedAdapter]     # a folder -> its adapter, within limits


@dataclass(frozen=True)
class FolderContents:
    adapter: ParsedAdapter
    sha256: str
    contract: AdapterContract | None


def read_folder(folder: Path, load: LoadFolder) -> FolderContents:
    """Parse and hash a store folder (config, weights, optional loraplex.json)."""
    contract_bytes = read_contract(folder)
    contract = None if contract_bytes is None else parse_contract(contract_bytes)
    adapter = load(folder)
    sha = file_sha256(read(folder / CONFIG_FILE), folder / WEIGHTS_FILE, contract_bytes=contract_bytes)
    return FolderContents(adapter, sha, contract)


def file_id(path: Path) -> tuple[int, int, int, int]:
    """Which file `path` names now: a rename in of another file changes it."""
    try:
        st = path.stat()
    except OSError as exc:
        raise AdapterFormatError(f"cannot read {path.name}: {exc.strerror}") from None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def read_contract(folder: Path) -> bytes | None:
    """The folder's loraplex.json bytes, or None when it has none."""
    path = folder / CONTRACT_FILE
    return read(path) if path.is_file() else None


def read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AdapterFormatError(f"cannot read {path.name}: {exc.strerror}") from None
