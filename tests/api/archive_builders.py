"""Build real .zip / .tar / .tar.gz files, benign and hostile, in memory."""

from __future__ import annotations

import gzip
import io
import stat
import tarfile
import zipfile

CONFIG = b'{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "peft_type": "LORA"}'
WEIGHTS = b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"__metadata__":{}}'[:16]


def make_zip(members: list[tuple[str, bytes] | zipfile.ZipInfo | tuple[zipfile.ZipInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for member in members:
            if isinstance(member, tuple) and isinstance(member[0], zipfile.ZipInfo):
                archive.writestr(member[0], member[1])
            else:
                name, data = member
                archive.writestr(name, data)
    return buffer.getvalue()


def zip_entry(name: str, mode: int, data: bytes = b"x") -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix, so the mode bits count
    info.external_attr = mode << 16
    return info, data


def tar_member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def make_tar(members: list[tuple[tarfile.TarInfo, bytes] | tuple[str, bytes]], gz: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for member in members:
            if isinstance(member[0], str):
                member = tar_member(member[0], member[1])
            info, data = member
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    raw = buffer.getvalue()
    return gzip.compress(raw) if gz else raw


def good_members(prefix: str = "") -> list[tuple[str, bytes]]:
    return [(f"{prefix}adapter_config.json", CONFIG), (f"{prefix}adapter_model.safetensors", WEIGHTS),
            (f"{prefix}README.md", b"# adapter")]


SYMLINK = stat.S_IFLNK | 0o777
CHAR_DEVICE = stat.S_IFCHR | 0o600
