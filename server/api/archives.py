"""Read an adapter out of an uploaded .zip, .tar or .tar.gz file without trusting it.

Nothing is ever extracted with `extractall`: the archive file is inspected member by
member and only the two adapter files (and an optional `loraplex.json`) are copied, with bounded reads, into temporary
files of the upload's work folder; no member is ever held whole in memory. Refused:
absolute paths, `..`, symbolic and hard links, devices, FIFOs, encrypted zip members,
more than `MAX_MEMBERS` members, duplicate adapter files, pickle weights, and anything
that decompresses to more than the size limit (zip and gzip bombs included: sizes
declared in headers are checked first, then every copy stops one chunk past the limit).
"""

from __future__ import annotations

import stat
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO, Literal

from server.adapters.names import CONFIG_FILE, CONTRACT_FILE, WEIGHTS_FILE
from server.api.errors import ApiError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_MEMBERS = 16
COPY_CHUNK = 1 << 20
EOCD_SEARCH = 65557          # the end-of-central-directory record is within this many bytes of the end


class ArchiveError(ApiError):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(status, message, code="invalid_archive" if status == 400 else "adapter_too_large",
                         param="archive")


def pickle_message(name: str) -> str:
    return (f"'{name}' is a pickle checkpoint: pickle weights are refused and never unpickled. "
            "Upload adapter_model.safetensors instead (PEFT: model.save_pretrained(folder), "
            "which writes safetensors by default).")


def too_large(what: str, limit: int) -> ArchiveError:
    return ArchiveError(f"{what} is larger than the limit of {limit} bytes (--max-adapter-bytes)", status=413)


def read_archive(path: Path, limit: int, workdir: Path) -> dict[str, Path]:
    """The adapter files of the archive at `path`, copied into `workdir`: {file name: temp path}."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return _read_zip(path, limit, workdir)
    if head[:2] == b"\x1f\x8b":
        return _read_tar(path, limit, workdir, "r|gz")
    if len(head) >= 512 and head[257:262] == b"ustar":
        return _read_tar(path, limit, workdir, "r|")
    raise ArchiveError("the archive is not a .zip, .tar or .tar.gz file")


def check_member_name(name: str) -> str | None:
    """The adapter file this member is (its base name) if wanted, None to skip it; raises if unsafe."""
    if not name or "\x00" in name:
        raise ArchiveError("archive member with an empty or NUL-containing name")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"archive member '{name}' has an absolute path")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise ArchiveError(f"archive member '{name}' has a '..' path component")
    base = PurePosixPath(name.replace("\\", "/")).name
    if base.lower().endswith(PICKLE_SUFFIXES):
        raise ArchiveError(pickle_message(name))
    return base if base in (CONFIG_FILE, WEIGHTS_FILE, CONTRACT_FILE) else None


class _Collector:
    """Copies the two adapter files into `workdir`, checking duplicates and the decompressed total."""

    def __init__(self, limit: int, workdir: Path) -> None:
        self.limit, self.workdir, self.total = limit, workdir, 0
        self.files: dict[str, Path] = {}

    def want(self, name: str) -> str | None:
        base = check_member_name(name)
        if base is not None and base in self.files:
            raise ArchiveError(f"the archive holds more than one {base}")
        return base

    def add(self, base: str, reader: IO[bytes]) -> None:
        target = self.workdir / f"member-{base}"
        with open(target, "wb") as out:
            while chunk := reader.read(COPY_CHUNK):
                self.total += len(chunk)
                if self.total > self.limit:
                    raise too_large("the archive's decompressed content", self.limit)
                out.write(chunk)
        self.files[base] = target

    def result(self) -> dict[str, Path]:
        for needed in (CONFIG_FILE, WEIGHTS_FILE):
            if needed not in self.files:
                raise ArchiveError(f"the archive has no {needed}")
        return self.files


def _zip_entry_count(path: Path) -> int:
    """Entries announced by the end-of-central-directory record, read before zipfile parses it."""
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        handle.seek(max(0, size - EOCD_SEARCH))
        tail = handle.read()
    end = tail.rfind(b"PK\x05\x06")
    if end < 0 or end + 22 > len(tail):
        raise ArchiveError("the zip archive has no end-of-central-directory record")
    return struct.unpack_from("<H", tail, end + 10)[0]


def _read_zip(path: Path, limit: int, workdir: Path) -> dict[str, Path]:
    count = _zip_entry_count(path)
    if count > MAX_MEMBERS:  # also catches zip64's 0xFFFF marker
        raise ArchiveError(f"the archive has {count} members; at most {MAX_MEMBERS} are accepted")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise ArchiveError(f"the zip archive is corrupt: {exc}") from exc
    with archive:
        members = archive.infolist()
        if len(members) > MAX_MEMBERS:
            raise ArchiveError(f"the archive has {len(members)} members; at most {MAX_MEMBERS} are accepted")
        if sum(m.file_size for m in members) > limit:
            raise too_large("the archive's decompressed content", limit)
        collector = _Collector(limit, workdir)
        for member in members:
            _check_mode(member.filename, member.external_attr >> 16)
            if member.flag_bits & 0x1:
                raise ArchiveError(f"archive member '{member.filename}' is encrypted")
            base = collector.want(member.filename)
            if member.is_dir() or base is None:
                continue
            try:
                with archive.open(member) as reader:
                    collector.add(base, reader)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
                raise ArchiveError(f"archive member '{member.filename}' cannot be read: {exc}") from exc
        return collector.result()


def _check_mode(name: str, mode: int) -> None:
    if stat.S_ISLNK(mode):
        raise ArchiveError(f"archive member '{name}' is a symbolic link; links are refused")
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        raise ArchiveError(f"archive member '{name}' is a device, FIFO or socket; only regular files are accepted")


def _read_tar(path: Path, limit: int, workdir: Path, mode: Literal["r|", "r|gz"]) -> dict[str, Path]:
    """Stream mode (`r|`, `r|gz`): one pass, no seeking, so a .tar.gz is inflated once, chunk by chunk."""
    collector, count, declared = _Collector(limit, workdir), 0, 0
    try:
        with open(path, "rb") as handle, tarfile.open(fileobj=handle, mode=mode) as archive:
            for member in archive:  # headers are parsed one at a time, so the count check stops early
                count += 1
                if count > MAX_MEMBERS:
                    raise ArchiveError(f"the archive has more than {MAX_MEMBERS} members")
                _check_tar_member(member)
                base = collector.want(member.name)
                if member.isdir():
                    continue
                declared += member.size
                if declared > limit:
                    raise too_large("the archive's decompressed content", limit)
                if base is not None:
                    reader = archive.extractfile(member)
                    assert reader is not None
                    collector.add(base, reader)
    except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
        raise ArchiveError(f"the tar archive is corrupt or truncated: {exc}") from exc
    return collector.result()


def _check_tar_member(member: tarfile.TarInfo) -> None:
    if member.issym() or member.islnk():
        raise ArchiveError(f"archive member '{member.name}' is a link ('{member.linkname}'); links are refused")
    if member.ischr() or member.isblk() or member.isfifo():
        raise ArchiveError(f"archive member '{member.name}' is a device or FIFO; only regular files are accepted")
    if not (member.isreg() or member.isdir()):
        raise ArchiveError(f"archive member '{member.name}' is not a regular file")
