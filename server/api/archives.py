"""Read an adapter out of an uploaded .zip, .tar or .tar.gz without trusting it.

Nothing is ever extracted to disk (no `extractall`): the archive is inspected member by
member and only the two adapter files are read, with bounded reads. Refused: absolute
paths, `..`, symbolic and hard links, devices, FIFOs, encrypted zip members, more than
`MAX_MEMBERS` members, duplicate adapter files, pickle weights, and anything that
decompresses to more than the size limit (zip bombs included: sizes declared in headers
are checked first, then every read stops one byte past the limit).
"""

from __future__ import annotations

import io
import stat
import struct
import tarfile
import zipfile
import zlib
from pathlib import PurePosixPath

from server.api.errors import ApiError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_MEMBERS = 16
TAR_SLACK = 64 * 1024        # headers and padding a .tar adds on top of its members


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


def read_archive(data: bytes, limit: int) -> dict[str, bytes]:
    """The adapter files of an archive: {"adapter_config.json": ..., "adapter_model.safetensors": ...}."""
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return _read_zip(data, limit)
    if data[:2] == b"\x1f\x8b":
        return _read_tar(_gunzip(data, limit + TAR_SLACK, limit), limit)
    if len(data) >= 512 and data[257:262] == b"ustar":
        return _read_tar(data, limit)
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
    return base if base in (CONFIG_FILE, WEIGHTS_FILE) else None


class _Collector:
    """Gathers the two adapter files, checking duplicates and the decompressed total."""

    def __init__(self, limit: int) -> None:
        self.limit, self.total, self.files = limit, 0, {}

    def want(self, name: str) -> str | None:
        base = check_member_name(name)
        if base is not None and base in self.files:
            raise ArchiveError(f"the archive holds more than one {base}")
        return base

    def add(self, base: str, reader: io.BufferedIOBase | zipfile.ZipExtFile) -> None:
        room = self.limit - self.total
        content = reader.read(room + 1)
        if len(content) > room:
            raise too_large("the archive's decompressed content", self.limit)
        self.total += len(content)
        self.files[base] = content

    def result(self) -> dict[str, bytes]:
        for needed in (CONFIG_FILE, WEIGHTS_FILE):
            if needed not in self.files:
                raise ArchiveError(f"the archive has no {needed}")
        return self.files


def _zip_entry_count(data: bytes) -> int:
    """Entries announced by the end-of-central-directory record, read before zipfile parses it."""
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - 65557))
    if end < 0 or end + 22 > len(data):
        raise ArchiveError("the zip archive has no end-of-central-directory record")
    return struct.unpack_from("<H", data, end + 10)[0]


def _read_zip(data: bytes, limit: int) -> dict[str, bytes]:
    count = _zip_entry_count(data)
    if count > MAX_MEMBERS:  # also catches zip64's 0xFFFF marker
        raise ArchiveError(f"the archive has {count} members; at most {MAX_MEMBERS} are accepted")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise ArchiveError(f"the zip archive is corrupt: {exc}") from exc
    members = archive.infolist()
    if len(members) > MAX_MEMBERS:
        raise ArchiveError(f"the archive has {len(members)} members; at most {MAX_MEMBERS} are accepted")
    if sum(m.file_size for m in members) > limit:
        raise too_large("the archive's decompressed content", limit)
    collector = _Collector(limit)
    for member in members:
        mode = member.external_attr >> 16
        _check_mode(member.filename, mode)
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


def _gunzip(data: bytes, cap: int, limit: int) -> bytes:
    """Decompress a gzip stream, stopping as soon as the output passes `cap`."""
    inflater = zlib.decompressobj(wbits=31)
    out, pending = bytearray(), data
    try:
        while pending and not inflater.eof:
            out += inflater.decompress(pending, 1 << 20)
            if len(out) > cap:
                raise too_large("the archive's decompressed content", limit)
            pending = inflater.unconsumed_tail
        if not inflater.eof:
            raise ArchiveError("the .tar.gz archive is truncated")
    except zlib.error as exc:
        raise ArchiveError(f"the .tar.gz archive is corrupt: {exc}") from exc
    if inflater.unused_data.strip(b"\x00"):
        raise ArchiveError("the .tar.gz archive has trailing data after its gzip stream")
    return bytes(out)


def _read_tar(data: bytes, limit: int) -> dict[str, bytes]:
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    except tarfile.TarError as exc:
        raise ArchiveError(f"the tar archive is corrupt: {exc}") from exc
    collector, count, declared = _Collector(limit), 0, 0
    try:
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
    except tarfile.TarError as exc:
        raise ArchiveError(f"the tar archive is corrupt: {exc}") from exc
    return collector.result()


def _check_tar_member(member: tarfile.TarInfo) -> None:
    if member.issym() or member.islnk():
        raise ArchiveError(f"archive member '{member.name}' is a link ('{member.linkname}'); links are refused")
    if member.ischr() or member.isblk() or member.isfifo():
        raise ArchiveError(f"archive member '{member.name}' is a device or FIFO; only regular files are accepted")
    if not (member.isreg() or member.isdir()):
        raise ArchiveError(f"archive member '{member.name}' is not a regular file")
