"""Adapter uploads: a bounded, streaming multipart reader that writes file parts to temporary files.

The body is read chunk by chunk (each chunk within `--upload-read-timeout` seconds) with a
running count, and refused (413) the moment it passes the limit; a declared Content-Length
above the limit is refused before any of it is read. File parts go straight to temporary
files in a private work folder, so memory stays at one chunk whatever the upload's size.
Accepted parts (at most `MAX_PARTS`): the fields `name` and `overwrite`, and either the
files `adapter_config.json` + `adapter_model.safetensors` or one `archive` (.zip, .tar,
.tar.gz). A file part is identified by its field name, or by its file name when the field
name is not one of those. An optional third file, `loraplex.json` (the adapter's contract), may
come with the two files or inside the archive. Pickle weights are refused by name and by content and never
unpickled. The caller owns the work folder and removes it whatever happens (`Upload.cleanup`).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks
from starlette.requests import ClientDisconnect, Request

from server.adapters.contract import MAX_CONTRACT_BYTES
from server.adapters.names import CONFIG_FILE, CONTRACT_FILE, WEIGHTS_FILE, AdapterNameError, check_adapter_name
from server.api.archives import PICKLE_SUFFIXES, pickle_message, read_archive
from server.api.background import BackgroundPool
from server.api.body_limit import BodyReadTimeout, read_body_chunks
from server.api.errors import ApiError

FILE_KEYS = (CONFIG_FILE, WEIGHTS_FILE, CONTRACT_FILE, "archive")
FIELD_KEYS = ("name", "overwrite")
MAX_PARTS = 16
MAX_FIELD_BYTES = 1024
MAX_PART_HEADER_BYTES = 8 * 1024
MAX_CONFIG_BYTES = 1 << 20        # a PEFT config is a few hundred bytes
MULTIPART_SLACK = 64 * 1024       # boundaries, part headers and the small fields
DRAIN_LIMIT = 1 << 20             # read (and drop) at most this much of a refused body, so clients see the answer
PARSE_BATCH_BYTES = 1 << 20       # body chunks (~64 KiB each) handed to the parser thread together


@dataclass
class Upload:
    """A parsed upload: the config's bytes, and the weights as a file in `workdir` (removed by `cleanup`)."""

    name: str
    overwrite: bool
    config: bytes
    weights_path: Path
    workdir: Path
    contract: bytes | None = None   # loraplex.json, when sent

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def validate_name(name: str, base_name: str, param: str = "name") -> str:
    """The registry's rule (`check_adapter_name`), plus: not the base model's name in any letter case."""
    try:
        check_adapter_name(name, frozenset({base_name}))
    except AdapterNameError as exc:
        raise ApiError(400, str(exc)[:200], code="invalid_adapter_name", param=param) from None
    if name.casefold() == base_name.casefold():
        raise ApiError(400, f"invalid adapter name {name!r}: it is the base model's name",
                       code="invalid_adapter_name", param=param)
    return name


def parse_bool(value: str, param: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off", ""):
        return False
    raise ApiError(400, f"{param} must be true or false, not {value[:20]!r}", code="invalid_value", param=param)


def looks_like_pickle(head: bytes) -> bool:
    """A torch.save zip or a raw pickle stream posing as safetensors (safetensors: 8-byte size, then '{')."""
    if len(head) > 8 and head[8:9] == b"{":
        return False
    return head[:4] == b"PK\x03\x04" or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5)


def check_safetensors(path: Path, what: str) -> None:
    """Refuse pickle weights; everything else is the engine's to validate."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if looks_like_pickle(head):
        raise ApiError(400, pickle_message(what), code="invalid_adapter", param=WEIGHTS_FILE)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the upload is larger than the limit of {limit} bytes (--max-adapter-bytes)",
                    code="adapter_too_large", headers={"Connection": "close"})


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, code="invalid_upload", param=param)


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    header_bytes: int = 0
    key: str = ""
    is_file: bool = False
    data: bytearray = field(default_factory=bytearray)
    sink: BinaryIO | None = None


class MultipartReader:
    """Callbacks for python-multipart: fields kept (small), files written to `workdir`, all bounded."""

    def __init__(self, limit: int, base_name: str, workdir: Path) -> None:
        self.limit, self.base_name, self.workdir = limit, base_name, workdir
        self.file_bytes = 0
        self.parts = 0
        self.fields: dict[str, str] = {}
        self.files: dict[str, Path] = {}
        self._part = _Part()
        self.complete = False  # the closing boundary was seen
        self._header_name = bytearray()
        self._header_value = bytearray()

    def callbacks(self) -> MultipartCallbacks:
        return {"on_part_begin": self._begin, "on_header_field": self._hfield, "on_header_value": self._hvalue,
                "on_header_end": self._hend, "on_headers_finished": self._headers_done,
                "on_part_data": self._data, "on_part_end": self._end, "on_end": self._body_end}

    def _body_end(self) -> None:
        self.complete = True

    def _begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise invalid(f"the multipart body has more than {MAX_PARTS} parts")
        self._part = _Part()

    def _count_header(self, size: int) -> None:
        self._part.header_bytes += size
        if self._part.header_bytes > MAX_PART_HEADER_BYTES:
            raise invalid(f"a multipart part has more than {MAX_PART_HEADER_BYTES} bytes of headers")

    def _hfield(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_name += data[start:end]

    def _hvalue(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_value += data[start:end]

    def _hend(self) -> None:
        self._part.headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name, self._header_value = bytearray(), bytearray()

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._part.headers.get(b"content-disposition", b""))
        field_name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        part = self._part
        part.is_file = filename is not None
        if filename is None:
            if field_name not in FIELD_KEYS:
                raise invalid(f"unexpected form field {field_name[:80]!r}: the fields are 'name' and 'overwrite'",
                              field_name[:80])
            if field_name in self.fields:
                raise invalid(f"form field {field_name!r} was sent twice", field_name)
            part.key = field_name
            return
        base = filename.decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1]
        key = field_name if field_name in FILE_KEYS else base
        if key.lower().endswith(PICKLE_SUFFIXES) or base.lower().endswith(PICKLE_SUFFIXES):
            raise ApiError(400, pickle_message(base or key), code="invalid_adapter", param=field_name[:80])
        if key not in FILE_KEYS:
            raise invalid(f"unexpected file {key[:80]!r}: upload adapter_config.json and "
                          "adapter_model.safetensors (and optionally loraplex.json), or one archive", field_name[:80])
        if key in self.files:
            raise invalid(f"{key} was sent twice", key)
        part.key = key
        path = self.workdir / f"part-{key}"
        part.sink = open(path, "wb")
        self.files[key] = path

    def _data(self, data: bytes, start: int, end: int) -> None:
        part, size = self._part, end - start
        if part.sink is not None:
            self.file_bytes += size
            if self.file_bytes > self.limit:
                raise too_large(self.limit)
            part.sink.write(data[start:end])
            return
        if len(part.data) + size > MAX_FIELD_BYTES:
            raise invalid(f"form field {part.key!r} is longer than {MAX_FIELD_BYTES} bytes", part.key)
        part.data += data[start:end]

    def _end(self) -> None:
        part = self._part
        if part.sink is not None:
            part.sink.close()
            part.sink = None
            return
        value = part.data.decode("utf-8", "replace")
        if part.key == "name":
            validate_name(value, self.base_name)  # fail fast, before the files arrive
        self.fields[part.key] = value

    def close(self) -> None:
        if self._part.sink is not None:
            self._part.sink.close()
            self._part.sink = None


def check_content_type(request: Request) -> bytes:
    """The multipart boundary; 415 for anything that is not multipart/form-data."""
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise ApiError(415, "send the adapter as multipart/form-data (fields: name, overwrite; files: "
                            "adapter_config.json + adapter_model.safetensors, or archive)", code="invalid_upload")
    return options[b"boundary"]


async def read_upload(request: Request, pool: BackgroundPool, limit: int, base_name: str, read_timeout: float,
                      tmp_root: Path | None = None) -> Upload:
    """Parse, bound and check a multipart adapter upload; nothing about the adapter itself is trusted.

    Parsing, disk writes and the archive and pickle checks run on `pool` (low priority).

    On success the caller must call `Upload.cleanup()`; on failure nothing is left on disk.
    """
    boundary = check_content_type(request)
    body_limit = limit + MULTIPART_SLACK
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > body_limit:
        raise too_large(limit)
    workdir = Path(tempfile.mkdtemp(prefix="loraplex-upload-", dir=tmp_root))
    try:
        reader = MultipartReader(limit, base_name, workdir)
        try:
            await _parse(request, pool, reader, boundary, body_limit, limit, read_timeout)
        finally:
            reader.close()
        return await pool.run(_assemble, reader, limit, base_name, workdir)
    except BaseException:
        # Synchronous on purpose: this also runs when the task is cancelled (shutdown grace over).
        shutil.rmtree(workdir, ignore_errors=True)
        raise


async def _parse(request: Request, pool: BackgroundPool, reader: MultipartReader, boundary: bytes,
                 body_limit: int, limit: int, read_timeout: float) -> None:
    parser = MultipartParser(boundary, reader.callbacks())
    received, batch = 0, bytearray()
    chunks = read_body_chunks(request.receive, read_timeout)
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > body_limit:
                raise too_large(limit)
            batch += chunk
            if len(batch) >= PARSE_BATCH_BYTES:
                # The parser's callbacks write to disk: off the event loop, about 1 MiB at a time.
                await pool.run(parser.write, bytes(batch))
                batch.clear()
        if batch:
            await pool.run(parser.write, bytes(batch))
        parser.finalize()
        if not reader.complete:
            raise invalid("malformed multipart body: it ends before its closing boundary")
    except FormParserError as exc:
        raise invalid(f"malformed multipart body: {exc}") from exc
    except BodyReadTimeout as exc:
        raise ApiError(408, f"the client sent nothing for {read_timeout:g} s during the upload "
                            "(--upload-read-timeout)", code="request_timeout", headers={"Connection": "close"}) from exc
    except ClientDisconnect as exc:
        raise ApiError(400, "the client went away during the upload", code="client_disconnected") from exc
    except ApiError:
        await _drain(chunks, received)
        raise


async def _drain(chunks, received: int) -> None:
    """Read a little more of a refused body (dropping it) so a small client sees the answer, not a reset."""
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > DRAIN_LIMIT:
                return
    except Exception:
        return


def _assemble(reader: MultipartReader, limit: int, base_name: str, workdir: Path) -> Upload:
    if "name" not in reader.fields:
        raise invalid("missing form field 'name' (the adapter's name)", "name")
    name = validate_name(reader.fields["name"], base_name)
    overwrite = parse_bool(reader.fields.get("overwrite", "false"), "overwrite")
    files = reader.files
    if "archive" in files:
        if len(files) > 1:
            raise invalid("send either one archive or the two adapter files, not both", "archive")
        files = read_archive(files["archive"], limit, workdir)
    for needed in (CONFIG_FILE, WEIGHTS_FILE):
        if needed not in files:
            raise ApiError(400, f"the upload has no {needed}: send adapter_config.json and "
                                "adapter_model.safetensors, or one archive holding them",
                           code="invalid_adapter", param=needed)
    check_safetensors(files[WEIGHTS_FILE], WEIGHTS_FILE)
    contract = read_config(files[CONTRACT_FILE], CONTRACT_FILE, MAX_CONTRACT_BYTES) if CONTRACT_FILE in files else None
    return Upload(name=name, overwrite=overwrite, config=read_config(files[CONFIG_FILE]),
                  weights_path=files[WEIGHTS_FILE], workdir=workdir, contract=contract)


def read_config(path: Path, what: str = CONFIG_FILE, limit: int = MAX_CONFIG_BYTES) -> bytes:
    with open(path, "rb") as handle:
        config = handle.read(limit + 1)
    if len(config) > limit:
        raise ApiError(400, f"{what} is larger than {limit} bytes", code="invalid_adapter", param=what)
    return config


class UploadSlots:
    """At most `limit` uploads at once; the next one gets a 429 with Retry-After instead of waiting."""

    def __init__(self, limit: int) -> None:
        self.limit, self.active = limit, 0

    def try_acquire(self) -> bool:
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1
